"""Run as a script: rebuild a tiny base model, load an MFTC adapter with PEFT and write the logits (safetensors)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import CASES_BY_NAME, outputs  # noqa: E402

import mftc_peft  # noqa: E402, F401  (registers the `mftc` tuner type: PEFT has no plugin discovery)

if __name__ == "__main__":
    case_name, adapter_dir, out_path = sys.argv[1:4]
    case = CASES_BY_NAME[case_name]
    model = PeftModel.from_pretrained(case.model(), adapter_dir).eval()
    with torch.no_grad():
        logits = outputs(model, case.inputs())
    save_file({"logits": logits.contiguous()}, out_path)
