"""redistill: distil a teacher LLM's relation triples into a small student model.

Importing the package quiets two messages of the libraries it drives that are harmless here and would bury the
stages' own output:
- bitsandbytes, on CPUs with AVX512-BF16, warns at import that it can't fetch an optional 4-bit CPU kernel from the
  Hugging Face Hub (the `kernels` package); its built-in kernel runs instead, and QLoRA trains on GPUs anyway.
- trl 1.16 reads transformers 5's `is_gradient_checkpointing`, deprecated in favour of `is_activation_checkpointing`.
"""

import logging
import warnings

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
