"""TRL glue: SFT from a recipe, with the training mask the scoring engine uses."""
