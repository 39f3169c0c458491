"""Files copied into an export for transformers' custom-architecture mechanism (``trust_remote_code=True``).

``modeling_dualpriv_llava.py`` is self-contained (it imports torch and transformers only, never the toolkit):
:mod:`toolkit.remote_export` copies it into an export and registers it through ``auto_map``.
"""
from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_dualpriv_llava.py")
