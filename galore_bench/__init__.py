"""galore-bench: will this training recipe fit, how fast will it run, what does it cost in quality."""
__version__ = "0.1.0"
