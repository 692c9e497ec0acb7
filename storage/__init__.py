"""How bytes live on disk: the content-addressed, recipe-keyed artifact store. No ML knowledge here."""

from storage.artifact_store import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactRef,
    ArtifactStore,
    CorruptArtifact,
    Recipe,
    default_home,
)

__all__ = [
    "ArtifactError",
    "ArtifactNotFound",
    "ArtifactRef",
    "ArtifactStore",
    "CorruptArtifact",
    "Recipe",
    "default_home",
]
