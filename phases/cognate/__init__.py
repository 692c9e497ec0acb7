"""Phase 1, Cognate. Importing this package registers the model with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from phases.cognate.configuration import CognateConfig
from phases.cognate.modeling import CognateForCausalLM

hf_logging.disable_progress_bar()  # per-shard bars flood task logs; tasks report their own progress
AutoConfig.register("cognate", CognateConfig, exist_ok=True)
AutoModelForCausalLM.register(CognateConfig, CognateForCausalLM, exist_ok=True)

__all__ = ["CognateConfig", "CognateForCausalLM"]
