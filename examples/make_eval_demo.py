"""Write the offline inputs of configs/eval-pareto-tiny.yaml into a folder (default build/eval-demo):

    captions.json          a COCO-format captions file (8 images x 2 captions)
    images/                8 small JPEG reference images (coloured shapes; non-square, like COCO's)
    inception-random.pth   the FID Inception architecture with Kaiming-initialised random weights
    tiny-clip/             a tiny random CLIPModel + tokenizer + image processor

None of it is real data or real weights: it lets the whole evaluation run on a laptop CPU.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.metrics.tiny import save_random_inception, save_tiny_clip  # noqa: E402

SUBJECTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple house", "an orange cat",
            "a black dog", "a white boat"]


def write_demo(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, subject in enumerate(SUBJECTS):
        h, w = 48 + 8 * (i % 3), 64 + 8 * (i % 2)
        arr = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        arr[y:y + h // 2, x:x + w // 2] = rng.integers(0, 256, 3)
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(arr).save(root / "images" / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        annotations.append({"id": 100 + 2 * i, "image_id": i + 1, "caption": f"{subject} on a table"})
        annotations.append({"id": 101 + 2 * i, "image_id": i + 1, "caption": f"A photo of {subject}.\n"})
    (root / "captions.json").write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    save_random_inception(root / "inception-random.pth")
    save_tiny_clip(root / "tiny-clip")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/eval-demo")
    write_demo(out)
    print(f"wrote {out}/captions.json, images/, inception-random.pth, tiny-clip/")
