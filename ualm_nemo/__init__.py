"""ualm_nemo: training and serving stack for UALM (unified audio language model) on Megatron-Core + NeMo."""

__version__ = "0.1.0"
