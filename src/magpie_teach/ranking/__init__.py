"""The verbs that rank teachers over the scoring engine: `rank` (:mod:`.rank`), `calibrate` (:mod:`.calibrate`) and
`paradox` (:mod:`.paradox`). Each takes one config dataclass, checks it, writes its folder under the folder lock
(``artefacts.RunOutputs``) and says what it found; the numbers come from :mod:`magpie_teach.scoring`, which
writes no output folder."""
