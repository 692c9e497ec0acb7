"""Units of resumable work: Prefect tasks that take artifact refs + a config, call phases/, write to
storage/, and return small ArtifactRefs."""
