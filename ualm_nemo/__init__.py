"""ualm_nemo: training and serving stack for UALM (unified audio language model) on Megatron-Core + NeMo."""

from ualm_nemo.compat import quiet_logs as _quiet_logs

_quiet_logs.install()  # before megatron-core is imported: its repeated TE/Apex notes become one line

__version__ = "0.1.0"
