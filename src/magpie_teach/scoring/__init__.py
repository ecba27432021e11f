"""The scoring engine: compatibility loss, reward, CAR, the paper's baselines, ranking and the paradox report.

Nothing here knows of distilabel, Argilla or the Hub.
"""
