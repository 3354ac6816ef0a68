"""SAELens's side of the SAE agreement test (runs in `.peers/sl`; no circuitlang import).

    python sl_sae.py FOLDER INPUTS OUT

Loads the SAE in FOLDER with `SAE.load_from_disk`, reads `x` [..., d_in] from the
safetensors file INPUTS, and writes `features` (encode(x)), `reconstruction`
(decode(encode(x))) and the SAE's class name (in the metadata) to OUT.
"""
from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    folder, inputs, out = sys.argv[1:4]
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder, device="cpu")
    x = load_file(inputs)["x"]
    with torch.no_grad():
        features = sae.encode(x)
        reconstruction = sae.decode(features)
    save_file({"features": features.contiguous(), "reconstruction": reconstruction.contiguous()}, out,
              metadata={"class": type(sae).__name__})


if __name__ == "__main__":
    main()
