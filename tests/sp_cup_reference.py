"""The reference's per-batch objective, transcribed line by line (Purdue-M2/SP_CUP, train_test_clipv1.py).

calculate_loss of its train_epoch with its helpers (search_func, searched_lamda_loss, pAUCLoss,
BinaryVSLoss), scipy's fminbound search included. The only change: `index.type(torch.cuda.FloatTensor)`
-> `.float()`, so it runs on a CPU. Used by tests/test_sp_cup.py and bench/sp_cup_diffs.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import optimize


def _threshplus_tensor(x):
    return torch.nn.ReLU()(x.clone())


def _search_func(losses, alpha):
    return lambda x: x + (1.0 / alpha) * (_threshplus_tensor(losses - x).mean().item())


def _searched_lamda_loss(losses, searched_lamda, alpha):
    return searched_lamda + ((1.0 / alpha) * torch.mean(_threshplus_tensor(losses - searched_lamda)))


def _p_auc(score_neg, score_pos):  # pAUCLoss(k=False, reduction='mean', norm=False)
    y_pos = torch.reshape(score_pos, (-1, 1))
    y_neg = torch.reshape(score_neg, (-1, 1))
    yy = y_pos - torch.transpose(y_neg, 0, 1)
    logistic_loss = -torch.log(torch.clamp(torch.sigmoid(yy), min=1e-6, max=1 - 1e-6))
    return logistic_loss.sum() / (len(score_pos) * len(score_neg))


def binary_vs(x, target, reduction, iota_pos=-0.05, iota_neg=0.05, Delta_pos=0.9, Delta_neg=1.1):
    iota_list = torch.tensor([iota_neg, iota_pos], dtype=torch.float32)
    Delta_list = torch.tensor([Delta_neg, Delta_pos], dtype=torch.float32)
    index = torch.zeros((x.shape[0], 2), dtype=torch.uint8)
    target = target.view(-1, 1)
    x = x.view(-1, 1)
    index.scatter_(1, target.long(), 1)
    index_float = index.float()  # the reference: index.type(torch.cuda.FloatTensor)
    batch_iota = torch.matmul(iota_list, index_float.t()).view((-1, 1))
    batch_Delta = torch.matmul(Delta_list, index_float.t()).view((-1, 1))
    output = x * batch_Delta - batch_iota
    return F.binary_cross_entropy_with_logits(10 * output, target, reduction=reduction)


def _exact_search_func(losses, alpha):
    """_search_func evaluated in float64: the reference's own float32 evaluation is noisy where f is flat."""
    losses = losses.detach().double()
    return lambda x: x + (1.0 / alpha) * (_threshplus_tensor(losses - x).mean().item())


def reference_loss(output, labels, loss_type, alpha, gamma, *, exact_search=False):
    """(loss, cutpt): calculate_loss of the reference's train_epoch; cutpt is its searched lambda (or None).

    exact_search: run its fminbound on its own function evaluated in float64 with xtol 1e-12, so
    cutpt is the minimiser of its formula to 1e-9; without, the search is the reference's literally.
    """
    search_func = _exact_search_func if exact_search else _search_func
    fminbound = (lambda f, a, b: optimize.fminbound(f, a, b, xtol=1e-12, maxfun=5000)) if exact_search \
        else optimize.fminbound
    loss_ce = nn.BCEWithLogitsLoss(reduction="none")(output, labels)
    if loss_type == "erm":
        return loss_ce.mean(), None
    if loss_type == "dag":
        cutpt = fminbound(search_func(loss_ce, alpha), np.min(loss_ce.cpu().detach().numpy()) - 1000.0,
                                   np.max(loss_ce.cpu().detach().numpy()))
        return _searched_lamda_loss(loss_ce, cutpt, alpha), cutpt
    if loss_type == "auc":
        score_pos, score_neg = output[labels == 1], output[labels == 0]
        if len(score_pos) == 0 or len(score_neg) == 0:
            return loss_ce.mean(), None
        return loss_ce.mean() + gamma * _p_auc(score_neg, score_pos), None
    if loss_type == "vs":
        return binary_vs(output, labels, "mean"), None
    assert loss_type == "vs_cvar_auc"
    vs_loss = binary_vs(output, labels, "none")
    cutpt = fminbound(search_func(vs_loss, alpha), np.min(loss_ce.cpu().detach().numpy()) - 1000.0,
                               np.max(loss_ce.cpu().detach().numpy()))
    cvar_loss = _searched_lamda_loss(loss_ce, cutpt, alpha)
    score_pos, score_neg = output[labels == 1], output[labels == 0]
    if len(score_pos) == 0 or len(score_neg) == 0:
        return loss_ce.mean(), cutpt
    return cvar_loss + gamma * _p_auc(score_neg, score_pos), cutpt
