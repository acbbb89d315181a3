"""KID and the ``clean`` resize against the installed reference implementations, on identical inputs.

torch-fidelity and clean-fid declare torch/torchvision requirements that pip cannot satisfy here (and
torchvision is unusable on the development machine), so they are installed without dependencies into a
folder of their own, and ``torchvision`` (imported at their package level, unused by the functions compared)
is replaced by an empty stub module::

    python -m pip install --no-deps --target /tmp/kid-ref torch-fidelity==0.4.0 clean-fid==0.1.35
    .venv/bin/python bench/kid_crosscheck.py --site /tmp/kid-ref

Compared: ``batch.metrics.fid.kid`` vs ``torch_fidelity.metric_kid.kid_features_to_metric`` (same seed: the
same subsets; float64 features), vs ``cleanfid.fid.kernel_distance`` (subsets of the whole sets, so no draw
differs), and ``batch.metrics.fid.clean_resize`` vs ``cleanfid.resize.make_resizer("PIL", False, "bicubic",
(299, 299))``. Prints one ``RESULT {json}`` line with the relative differences.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import time
from unittest import mock

import numpy as np

from common import emit

from batch.metrics.fid import clean_resize, kid


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import torchvision[.x]`` yields a MagicMock module (the reference packages import it at load time)."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__ = [], spec
        return module

    def exec_module(self, module):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", required=True, help="folder with torch-fidelity and clean-fid (pip --target)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-ref", type=int, default=3000)
    ap.add_argument("--dim", type=int, default=2048)
    args = ap.parse_args()
    sys.path.insert(0, args.site)
    sys.meta_path.insert(0, _StubTorchvision())
    import torch
    from importlib import metadata

    import cleanfid.fid as cf
    import cleanfid.resize as cr
    import torch_fidelity.metric_kid as tf

    rng = np.random.default_rng(0)
    # Inception pool features are non-negative averages of ReLU outputs: |N(0, 1)| scaled, a shifted second set
    f = np.abs(rng.standard_normal((args.n, args.dim))) * 0.5
    r = np.abs(rng.standard_normal((args.n_ref, args.dim))) * 0.55 + 0.01

    t0 = time.perf_counter()
    ours_mean, ours_std, m = kid(f, r, subsets=100, subset_size=1000, seed=2020)
    t_ours = time.perf_counter() - t0
    ref = tf.kid_features_to_metric(torch.from_numpy(f), torch.from_numpy(r), kid_subsets=100,
                                    kid_subset_size=1000, kid_degree=3, kid_gamma=None, kid_coef0=1,
                                    rng_seed=2020, verbose=False)
    tf_mean, tf_std = ref["kernel_inception_distance_mean"], ref["kernel_inception_distance_std"]

    # clean-fid: whole equal-size sets (every subset is the whole set), one subset
    n = min(args.n, args.n_ref, 1000)
    cf_val = cf.kernel_distance(f[:n], r[:n], num_subsets=1, max_subset_size=n)
    ours_full = kid(f[:n], r[:n], subsets=1, subset_size=n, seed=0)[0]

    img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    resize_diff = None
    try:
        ref_img = cr.make_resizer("PIL", False, "bicubic", (299, 299))(img)
        resize_diff = float(np.abs(clean_resize(img) - ref_img).max())
    except Exception as err:  # Pillow >= 11 may refuse fromarray(mode="F"), which clean-fid passes
        resize_diff = f"clean-fid resizer failed: {type(err).__name__}: {err}"

    emit({"bench": "kid_crosscheck", "n": args.n, "n_ref": args.n_ref, "dim": args.dim, "subset_size": m,
          "kid": ours_mean, "kid_std": ours_std, "torch_fidelity_kid": tf_mean, "torch_fidelity_std": tf_std,
          "rel_diff_torch_fidelity_mean": abs(ours_mean - tf_mean) / abs(tf_mean),
          "rel_diff_torch_fidelity_std": abs(ours_std - tf_std) / abs(tf_std),
          "kid_whole_sets": ours_full, "clean_fid_kid": cf_val,
          "rel_diff_clean_fid": abs(ours_full - cf_val) / abs(cf_val),
          "clean_resize_max_abs_diff": resize_diff, "ours_s": round(t_ours, 1),
          "torch_fidelity": metadata.version("torch-fidelity"), "clean_fid": metadata.version("clean-fid")})


if __name__ == "__main__":
    main()
