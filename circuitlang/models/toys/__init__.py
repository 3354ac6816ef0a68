"""The embedded toy models (one folder each) and the script that trains them (`train.py`)."""
