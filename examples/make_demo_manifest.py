"""Write the demo manifest: a few prompts, one with a fixed seed, one asking for 2 images, one carried column."""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    {"id": "lighthouse", "prompt": "a lighthouse on a cliff at dusk, oil painting", "seed": 1234, "num_images": 2,
     "source": "demo"},
    {"id": "astronaut", "prompt": "an astronaut riding a horse on mars", "seed": None, "num_images": None,
     "source": "demo"},
    {"id": "city-night", "prompt": "a neon city street at night, rain", "seed": 7, "num_images": None,
     "source": "demo"},
    {"id": "teapot", "prompt": "a porcelain teapot, studio photograph", "seed": None, "num_images": None,
     "source": "demo", "guidance_scale": 3.0},
]

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "prompts.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                        ("num_images", pa.int32()), ("guidance_scale", pa.float64()), ("source", pa.string())])
    pq.write_table(pa.Table.from_pylist(ROWS, schema=schema), out)
    print(f"wrote {len(ROWS)} prompts to {out}")
