"""Teacher responses with distilabel: configs, pipelines, and resume that survives SIGKILL."""
