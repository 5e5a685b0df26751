import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, reference
# LLM.apply_model ships a function to the engine process; vLLM asks for this opt-in.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
