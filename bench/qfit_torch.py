"""qfit_torch.py - the PyTorch transcription of tallyd's quantile aggregator
fit (daemon/methods/qagg*.c, qfit.c), the yardstick bench/qfit_vs_torch.sh
prints beside bench_qfit: the same aggregators, loss, optimiser and data
shapes, in float32.

  fine-global   q = Z @ softmax(logits [M*K, K], over the M*K rows)
  medium-local  MLP D -> 64 -> ELU -> 64 -> ELU -> M*K (depth 2), softmax over
                the M models for each level, q_k = sum_j w[j, k] z[j, k]
  loss          mean pinball over rows and levels (no penalty, no dropout)
  optimiser     Adam with AMSGrad, lr 1e-3, weight decay 1e-7
  one epoch     100,000 rows (M = 6, K = 99, D = 8) shuffled, minibatches

  python3 bench/qfit_torch.py ROWS BATCH NAME [THREADS]

prints "NAME PARAMS ROWS_PER_SECOND" for the fit alone (data made first).
Run with OPENBLAS_NUM_THREADS=1 (the script sets torch's own threads).
"""
import sys
import time

import torch

M, K, D, H = 6, 99, 8, 64


def data(n, g):
    x = torch.randn(n, D, generator=g)
    mu = 0.3 * x.sum(1)
    y = mu + torch.randn(n, generator=g)
    zq = torch.linspace(-2.326, 2.326, K)
    bias = 0.2 * torch.randn(n, M, 1, generator=g)
    sc = (0.7 + 0.1 * torch.arange(M, dtype=torch.float32)).view(1, M, 1)
    z = mu.view(n, 1, 1) + bias + sc * zq.view(1, 1, K)
    return z.contiguous(), x, y


class FineGlobal(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(M * K, K))

    def forward(self, z, x):
        w = torch.softmax(self.logits, dim=0)
        return z.reshape(z.shape[0], M * K) @ w


class MediumLocal(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(D, H), torch.nn.ELU(), torch.nn.Linear(H, H), torch.nn.ELU(),
            torch.nn.Linear(H, M * K))

    def forward(self, z, x):
        w = torch.softmax(self.net(x).view(-1, M, K), dim=1)
        return (w * z).sum(1)


def pinball(q, y, tau):
    d = y.unsqueeze(1) - q
    return torch.maximum(tau * d, (tau - 1) * d).mean()


def main():
    n, batch, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    g = torch.Generator().manual_seed(1)
    z, x, y = data(n, g)
    tau = torch.arange(1, K + 1, dtype=torch.float32) * 0.01
    model = {"fine-global": FineGlobal, "medium-local": MediumLocal}[name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-7, amsgrad=True)
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=g)
    for b0 in range(0, n, batch):
        idx = perm[b0:b0 + batch]
        opt.zero_grad()
        loss = pinball(model(z[idx], x[idx]), y[idx], tau)
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    print("%s %d %.0f" % (name, params, n / dt))


if __name__ == "__main__":
    main()
