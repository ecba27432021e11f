"""From scored responses to an SFT data set: whole-teacher and per-instruction selection, with filters."""
