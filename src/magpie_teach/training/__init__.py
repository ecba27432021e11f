"""TRL glue: SFT from a recipe, and checking CAR's teacher ranking against real fine-tunes."""
