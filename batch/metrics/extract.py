"""The feature stage: a callable class over pyarrow batches that reads images by URI and computes features.

``__init__`` loads the networks once per actor (FID Inception and/or CLIP); ``__call__(batch)`` reads each
row's image (``uri``, and ``member`` inside a WebDataset/Parquet shard: :class:`batch.store.formats.ImageReader`),
decodes it to RGB uint8 and appends

* ``inception``: the 2048 float32 pool features (see :mod:`batch.metrics.fid` for every preprocessing step;
  ``reference=True`` applies the reference crop/resize first),
* ``clip_score``: ``100 * max(cos, 0)`` against the row's ``prompt`` (when a CLIP model is given),
* ``feature_error``: null, or why this image has no features (unreadable file, ...): failures are data,
* ``feature_worker``: the host, process and GPU that computed them (:func:`batch.models.devices.worker_id`).

Ray-free: :func:`batch.run.pipeline.run_features` runs it as an actor pool; tests call it in-process.
"""

from __future__ import annotations

import traceback
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batch.models.devices import torch_device, worker_id
from batch.store.formats import ImageReader

INCEPTION_TYPE = pa.list_(pa.float32(), 2048)


class FeatureExtractor:
    """Feature stage (see module docstring). ``inception``: weights path/URL or None; ``clip``: model or None."""

    def __init__(self, inception: str | None, clip: str | None = None, clip_revision: str | None = None,
                 device: str = "cpu", storage_options: dict[str, Any] | None = None, reference: bool = False,
                 reference_size: int = 512, batch_size: int = 32, num_threads: int | None = None,
                 resize: str = "legacy_pytorch"):
        from batch.metrics.clip import ClipScorer
        from batch.metrics.inception import load_inception

        if num_threads:
            torch.set_num_threads(num_threads)
        device = torch_device(device)
        self.device = device
        self.worker = worker_id()
        self.inception = load_inception(inception, device=device) if inception else None
        self.clip = ClipScorer(clip, revision=clip_revision, device=device) if clip else None
        self.reader = ImageReader(storage_options)  # files, or members of the shard it last opened
        self.reference, self.reference_size, self.batch_size = reference, reference_size, batch_size
        self.resize = resize  # the resize path into Inception (``batch.metrics.fid.to_inception_input``)

    def _load(self, uri: str, member: str | None) -> np.ndarray:
        from batch.metrics.fid import prepare_reference

        img = self.reader.read({"uri": uri, "member": member})
        return prepare_reference(img, self.reference_size) if self.reference else img

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        from batch.metrics.fid import to_inception_input

        uris = batch.column("uri").to_pylist()
        members = batch.column("member").to_pylist() if "member" in batch.column_names else [None] * len(uris)
        prompts = batch.column("prompt").to_pylist() if self.clip else [None] * len(uris)
        n = len(uris)
        feats = np.zeros((n, INCEPTION_TYPE.list_size), np.float32)  # rows of images without features: null
        has_feats = np.zeros(n, bool)
        scores: list[float | None] = [None] * n
        errors: list[str | None] = [None] * n
        # 1. read and decode; a bad image fails alone
        images: dict[int, np.ndarray] = {}
        for i, uri in enumerate(uris):
            try:
                if not uri:
                    raise ValueError("uri: missing")
                images[i] = self._load(uri, members[i])
            except Exception as err:
                errors[i] = f"uri: cannot read {uri!r}: {type(err).__name__}: {err}"[:2000]
        # 2. networks in sub-batches of batch_size
        ok = sorted(images)
        for start in range(0, len(ok), self.batch_size):
            idx = ok[start:start + self.batch_size]
            try:
                if self.inception is not None:
                    x = torch.cat([to_inception_input(images[i][None], self.device, self.resize) for i in idx])
                    f = self.inception(x).float().cpu().numpy()
                    feats[idx], has_feats[idx] = f, True
                if self.clip is not None:
                    s = self.clip.scores([images[i] for i in idx], [prompts[i] for i in idx])
                    for j, i in enumerate(idx):
                        scores[i] = float(s[j])
            except Exception as err:
                traceback.print_exc()
                has_feats[idx] = False
                for i in idx:
                    scores[i], errors[i] = None, f"{type(err).__name__}: {err}"[:2000]
        # 3. the features as one Arrow column, straight from the float32 matrix (no per-value Python floats)
        inception = pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), type=INCEPTION_TYPE,
                                                      mask=pa.array(~has_feats))
        return (batch.append_column("inception", inception)
                .append_column("clip_score", pa.array(scores, pa.float64()))
                .append_column("feature_error", pa.array(errors, pa.string()))
                .append_column("feature_worker", pa.array([self.worker] * n, pa.string())))
