"""The measurement of cpu_skinny.rs through numpy's BLAS: x[m, 2048] @ W[2048, 6144] over eight
distinct weights in turn, median of five rounds of 32 products, ms per product."""
import time

import numpy as np

k, n = 2048, 6144
weights = [np.random.rand(k, n).astype(np.float32) - 0.5 for _ in range(8)]
line = ["numpy"]
for m in [1, 2, 4, 8, 16, 32, 64]:
    x = np.random.rand(m, k).astype(np.float32) - 0.5
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            for w in weights:
                x @ w
        rounds.append((time.perf_counter() - t) * 1e3 / (4 * len(weights)))
    rounds.sort()
    line.append(f"m{m}={rounds[len(rounds) // 2]:.2f}")
print(" ".join(line))
