"""Rollback cost over a Qwen2.5-1.5B-sized KV cache (28 layers' keys and values, 2 heads x 128, bfloat16):
the right-aligning rollback of commit b21f001 against today's, and closing holes in one copy.
    git show b21f001:llm_modules/decoding/speculative/target.py > /tmp/old_target.py
    python reports/speculative/batch_8_16_holes/micro_rollback.py /tmp/old_target.py
(run from the checkout; the "new" rows were taken while `keep_paths` still moved the kept branch nodes, before
it became a view)"""
import sys, time, torch, importlib.util
torch.set_num_threads(2)
from llm_modules.decoding.speculative import target as new
from llm_modules.decoding.steppers import Slot
spec = importlib.util.spec_from_file_location("old_target", sys.argv[1]); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
class H: pass
for B in (8, 16):
    S, N = 350, 5
    paths = [[0, 1, 2], [0], [0, 2], [0, 1], [0], [0, 1, 2, 3], [0], [0, 3]] * (B // 8)
    def mk():
        hs = []
        for _ in range(56):
            h = H(); h.t = torch.randn(B, 2, S + N, 128, dtype=torch.bfloat16); hs.append(h)
        return hs
    for name, fn in (("old", lambda sl: old.keep_cache_paths(sl, S, paths, S + 4)), ("new", lambda sl: new.keep_cache_paths(sl, S, paths))):
        ts = []
        for r in range(7):
            hs = mk(); sl = [Slot(h, "t") for h in hs]
            t0 = time.perf_counter(); fn(sl); ts.append(time.perf_counter() - t0)
        ts.sort(); print(B, name, "median ms", round(ts[3] * 1000, 2))
    # closing holes: one full gather
    hs = mk(); sl = [Slot(h, "t") for h in hs]
    mask = torch.ones(B, S + N, dtype=torch.long); mask[:, 100:140] = 0
    idx = new.close_holes(mask)
    t0 = time.perf_counter()
    for s in sl: s.set(new.gather_columns(s.get(), 2, idx))
    print(B, "close holes ms", round((time.perf_counter() - t0) * 1000, 2))
