"""Judging students: `evaluate` (answers, a judge, win rates) and `validate` (fine-tune a student per teacher, then
score the students and correlate with the metrics)."""
