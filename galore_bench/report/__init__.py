"""Stage 6: rendering only. Reads records from the store and writes md, csv, png and html."""
