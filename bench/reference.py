"""The reference-style baseline: an epoch spent the way SP_CUP's train_test_clipv1.py spends it.

Written from a reading of Purdue-M2/SP_CUP (not copied), to time the same work per epoch:
- files as the reference writes them: one contiguous HDF5 dataset of features per split
  (h5py create_dataset(data=...)) and a CSV table with a 'Target' label column;
- a torch Dataset that reads ONE HDF5 row per __getitem__ (h5py indexing) and its label from
  the table, batched by DataLoader(batch_size=256, shuffle=True) in the main process (the
  reference passes no num_workers);
- feature noise in a Python loop over the batch: first the per-sample distance-to-mean loop
  the reference runs to find its hard example, then z + lam * sigma * eps with sigma, lam ~ U(0, 1)
  drawn per sample; originals and noisy copies are concatenated and shuffled;
- the paper's MLP (3 x [Linear(768, 768), BatchNorm1d, ReLU, Dropout(0.335)] -> Linear(768, 1)), AdamW;
- CVaR by scipy.optimize.fminbound over lambda on the host every batch (each objective evaluation
  is a .item() sync), bounds [min(l) - 1000, max(l)], then lambda + mean(relu(l - lambda)) / alpha,
  plus gamma * pairwise logistic AUC loss; loss.item() every batch;
- validation as the reference: DataLoader(batch_size=32) over the val file, a per-batch sklearn
  confusion matrix, then roc_auc_score and macro precision / recall / F1.
The per-sample loss is BCE, the paper's configuration (the reference's 'vs_cvar_auc' mode searches
lambda on VS losses; the cost is the same). Left out, each of which would only add time: tqdm, the
per-epoch checkpoint save, and pandas (not a dependency): labels are read per row from a polars
table where the reference uses DataFrame.loc. Needs scipy and scikit-learn (the `test` extra).

    python bench/reference.py --rows 5000          # time one epoch on random rows
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from scipy import optimize
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common import clock, print_table, resolve_device, setup_threads

TRAIN_BATCH, VAL_BATCH = 256, 32  # the reference's defaults


def write_reference_files(x: np.ndarray, y: np.ndarray, folder: Path, name: str) -> tuple[Path, Path]:
    """x [N, D] and labels y [N] as the reference keeps them: NAME.h5 (one contiguous dataset) + NAME.csv."""
    h5_path, csv_path = folder / f"{name}.h5", folder / f"{name}.csv"
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("features", data=x)  # no chunks: contiguous, like the reference's extractor writes
    table = pl.DataFrame({"Image Path": [f"img/{i}.jpg" for i in range(len(y))], "Target": y.astype(np.int64)})
    table.write_csv(csv_path)
    return h5_path, csv_path


class RowDataset(Dataset):
    """One HDF5 row and its label per __getitem__, as the reference's Dataset."""

    def __init__(self, h5_path: Path, csv_path: Path):
        self.file = h5py.File(h5_path, "r")
        self.features = self.file["features"]
        self.labels = pl.read_csv(csv_path)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        feature = torch.tensor(self.features[idx], dtype=torch.float32)
        label = torch.tensor(self.labels.item(idx, "Target"), dtype=torch.float32)
        return feature, label


class ReferenceMLP(nn.Module):
    """The paper's head as the reference builds it (nn.Sequential, kaiming-uniform weights)."""

    def __init__(self, dim: int = 768, depth: int = 3, dropout: float = 0.335):
        super().__init__()
        blocks = []
        for _ in range(depth):
            blocks += [nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Dropout(dropout)]
        self.layers = nn.Sequential(*blocks)
        self.output_layer = nn.Linear(dim, 1)
        for m in [*self.layers, self.output_layer]:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.layers(x)
        return self.output_layer(features), features


def augment_per_sample(features: torch.Tensor) -> torch.Tensor:
    """Noisy copies of a batch, one sample at a time (the reference's loop)."""
    mean = features.mean(0)
    # The reference computes every sample's distance to the mean (for its hard example) each batch,
    # even with only the noise augmentation switched on; torch.tensor() of 0-d tensors reads each one.
    distances = torch.tensor([torch.norm(z - mean) for z in features])
    _hard_example = features[torch.argmax(distances)]
    noisy = []
    for z in features:
        sigma, lam = random.random(), random.random()
        noisy.append(z + lam * (torch.randn_like(z) * sigma))
    return torch.stack(noisy)


def search_lambda(losses: torch.Tensor, alpha: float) -> float:
    """CVaR's lambda by a host-side scalar search, as the reference: every evaluation is a .item() sync."""
    def objective(lam: float) -> float:
        return lam + (1.0 / alpha) * F.relu(losses - lam).mean().item()

    low = np.min(losses.detach().cpu().numpy()) - 1000.0
    high = np.max(losses.detach().cpu().numpy())
    return optimize.fminbound(objective, low, high)


def cvar_at(losses: torch.Tensor, lam: float, alpha: float) -> torch.Tensor:
    """The differentiable CVaR objective at the searched lambda."""
    return lam + (1.0 / alpha) * F.relu(losses - lam).mean()


def pairwise_auc(score_neg: torch.Tensor, score_pos: torch.Tensor) -> torch.Tensor:
    """Mean over (fake, real) pairs of -log(sigmoid(z_fake - z_real)), clamped as the reference."""
    diff = score_pos.reshape(-1, 1) - score_neg.reshape(1, -1)
    return -torch.log(torch.clamp(torch.sigmoid(diff), min=1e-6, max=1 - 1e-6)).mean()


@dataclass
class EpochTimes:
    train_s: float
    val_s: float
    steps: int
    train_rows: int
    val_rows: int
    train_loss: float
    val_auc: float
    parts: dict  # seconds of the training pass by part: rows (DataLoader), noise, lambda search, model

    @property
    def epoch_s(self) -> float:
        return self.train_s + self.val_s


class ReferenceTrainer:
    """The baseline's model, optimizer and loaders; `epoch()` times one training + validation pass."""

    def __init__(self, train_files: tuple[Path, Path], val_files: tuple[Path, Path], device: torch.device, *,
                 dim: int = 768, alpha: float = 0.3, gamma: float = 0.5, lr: float = 1e-3, weight_decay: float = 1e-4,
                 augment: bool = True, seed: int = 0):
        torch.manual_seed(seed)
        random.seed(seed)
        self.device, self.alpha, self.gamma, self.augment = device, alpha, gamma, augment
        pin = device.type == "cuda"
        self.train_loader = DataLoader(RowDataset(*train_files), batch_size=TRAIN_BATCH, shuffle=True, pin_memory=pin)
        self.val_loader = DataLoader(RowDataset(*val_files), batch_size=VAL_BATCH, shuffle=False, pin_memory=pin)
        self.model = ReferenceMLP(dim).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)

    def train_pass(self, max_steps: int | None = None) -> tuple[float, int, int, dict]:
        """(mean loss, steps, rows, seconds by part) of one pass over the training loader (or max_steps batches).

        The parts are cut with device syncs; the reference syncs many times per step already.
        """
        self.model.train()
        parts = dict.fromkeys(("rows", "noise", "lambda search", "model"), 0.0)
        total, steps, rows = 0.0, 0, 0
        t = clock(self.device)
        for inputs, labels in self.train_loader:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            t = _lap(parts, "rows", t, self.device)
            rows += len(labels)
            if self.augment:
                inputs = torch.cat([inputs, augment_per_sample(inputs)])
                labels = torch.cat([labels, labels])
                perm = torch.randperm(len(inputs))  # host permutation, as the reference
                inputs, labels = inputs[perm], labels[perm]
            t = _lap(parts, "noise", t, self.device)
            self.opt.zero_grad()
            output, _ = self.model(inputs)
            output = output.view(-1)  # the reference squeezes; view keeps a batch of one 1-d
            per_sample = F.binary_cross_entropy_with_logits(output, labels, reduction="none")
            t = _lap(parts, "model", t, self.device)
            lam = search_lambda(per_sample, self.alpha)
            t = _lap(parts, "lambda search", t, self.device)
            loss = cvar_at(per_sample, lam, self.alpha)
            score_pos, score_neg = output[labels == 1], output[labels == 0]
            if len(score_pos) and len(score_neg):  # a one-class batch: no AUC term
                loss = loss + self.gamma * pairwise_auc(score_neg, score_pos)
            loss.backward()
            self.opt.step()
            total += loss.item()
            steps += 1
            t = _lap(parts, "model", t, self.device)
            if max_steps is not None and steps >= max_steps:
                break
        return total / max(1, steps), steps, rows, parts

    @torch.no_grad()
    def val_pass(self) -> tuple[float, int]:
        """(AUC, rows) of the reference's evaluation loop over the validation loader."""
        self.model.eval()
        conf = np.zeros((2, 2))
        logits, preds, truth, feats = [], [], [], []
        total_loss = correct = seen = 0
        for inputs, labels in self.val_loader:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            output, _ = self.model(inputs)
            logits.extend(output.cpu().numpy())
            feats.extend(inputs.cpu().numpy())  # the reference keeps every input feature too
            total_loss += F.binary_cross_entropy_with_logits(output.view(-1), labels).item()
            predicted = (torch.sigmoid(output.view(-1)) >= 0.5).float()
            correct += (predicted == labels).sum().item()
            seen += labels.size(0)
            conf += confusion_matrix(labels.cpu().numpy(), predicted.cpu().numpy(), labels=[0, 1])
            preds.extend(predicted.cpu().numpy())
            truth.extend(labels.cpu().numpy())
        auc = roc_auc_score(truth, logits)
        for score in (precision_score, recall_score, f1_score):
            score(truth, preds, labels=[0, 1], average="macro", zero_division=0)
        return float(auc), seen

    def epoch(self) -> EpochTimes:
        t0 = clock(self.device)
        loss, steps, rows, parts = self.train_pass()
        t1 = clock(self.device)
        auc, val_rows = self.val_pass()
        t2 = clock(self.device)
        return EpochTimes(t1 - t0, t2 - t1, steps, rows, val_rows, loss, auc, parts)


def _lap(parts: dict, name: str, since: float, device: torch.device) -> float:
    now = clock(device)
    parts[name] += now - since
    return now


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=5000, help="synthetic rows (80%% train, 20%% val)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    setup_threads(args.threads)
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    y = (rng.random(args.rows) < 0.8).astype(np.int64)
    x = (rng.normal(size=(args.rows, args.dim)) + 1.5 * y[:, None] / np.sqrt(args.dim)).astype(np.float16)
    cut = int(0.8 * args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        files = (write_reference_files(x[:cut], y[:cut], Path(tmp), "train"),
                 write_reference_files(x[cut:], y[cut:], Path(tmp), "val"))
        trainer = ReferenceTrainer(*files, device, dim=args.dim)
        print(f"setup {time.perf_counter() - t:.2f}s on {device}")
        rows = []
        for e in range(args.epochs):
            r = trainer.epoch()
            rows.append(vars(r) | r.parts | {"epoch": e + 1, "epoch_s": r.epoch_s})
    print_table(rows, [("epoch", "epoch", ""), ("epoch_s", "epoch s", ".2f"), ("train_s", "train s", ".2f"),
                       ("val_s", "val s", ".2f"), *[(k, f"{k} s", ".2f") for k in rows[0]["parts"]],
                       ("steps", "steps", ""), ("val_auc", "val AUC", ".3f")])


if __name__ == "__main__":
    main()
