"""Phase 4, BitNet b1.58: ternary weights, int8 activations, packed 2-bit storage (see steps.py for the order).

This package's __init__ stays light because PipelineConfig imports its settings. ``import phases.bitnet.packed_format``
registers the packed format (quant_method ``bitnet_ternary``) with transformers, after which
``AutoModelForCausalLM.from_pretrained(packed_dir)`` builds the inference model.
"""
