"""Stage 9: galore-bench inside other people's training loops (the Hugging Face Trainer).

hf_args.py turns a `TrainingArguments` JSON and a model into a scenario, so `galore-bench run` can measure, simulate
or estimate the recipe a user already trains; hf_trainer.py is the callback that writes a record from the user's
real Trainer run with the same tracker the measure engine uses, so the two records can be compared field by field.
"""
