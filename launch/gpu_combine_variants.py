"""Times ways of doing the combine step (un-permute + weighted sum over k) on the GPU."""
import torch, statistics
T, k, H = 8192, 8, 4096
dev = torch.device("cuda")
back = torch.randn(T * k, H, device=dev, dtype=torch.bfloat16)
w = torch.rand(T, k, device=dev)
order = torch.randperm(T * k, device=dev)
inv = torch.empty_like(order); inv[order] = torch.arange(T * k, device=dev)

def a():
    c = torch.empty_like(back); c[order] = back
    return torch.bmm(w.to(back.dtype).unsqueeze(1), c.view(T, k, H)).view(T, H)
def b():
    c = back[inv].view(T, k, H)
    return (c * w.to(back.dtype).unsqueeze(-1)).sum(1)
def c():
    c = back[inv].view(T, k, H)
    return torch.bmm(w.to(back.dtype).unsqueeze(1), c).view(T, H)
def d():
    c = back.index_select(0, inv).view(T, k, H)
    return torch.einsum("tk,tkh->th", w.to(back.dtype), c)
def e():  # weights applied before un-permute, then sum
    ws = w.flatten()[order].to(back.dtype).unsqueeze(-1)
    return (back * ws)[inv].view(T, k, H).sum(1)
ref = a().float()
for name, fn in [("scatter+bmm", a), ("gather+mul+sum", b), ("gather+bmm", c), ("index_select+einsum", d), ("mul+gather+sum", e)]:
    for _ in range(3): fn()
    ts = []
    for _ in range(20):
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); out = fn(); t.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(t))
    print(f"{name:24s} {statistics.median(ts):.3f} ms  rel {float((out.float()-ref).norm()/ref.norm()):.1e}")
