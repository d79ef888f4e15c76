"""The demo model's circuit bars on IOI: faithfulness of the top-10% circuit and Pearson(EAP-IG, exact).

    python scripts/measure_ioi_bars.py 64     # the first 64 pairs of assets/tasks/ioi.csv
"""
import sys, time, torch
torch.set_num_threads(1)
from eapcore.models import load_model
from eapcore.data import PromptPairs, tokenize
from eapcore.attribute import AttributionSpec, attribute
from eapcore.curve import faithfulness_curve
from eapcore.evaluate import CircuitEvaluator
from eapcore.select import top_n
n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
m = load_model("demo", device="cpu")
pairs = PromptPairs.from_csv("assets/tasks/ioi.csv")
data = tokenize(PromptPairs.from_lists(pairs.clean[:n], pairs.corrupted[:n], pairs.correct[:n], pairs.incorrect[:n]), m.tokenizer, m.cfg.n_ctx)
ev = CircuitEvaluator(m, data, "logit_diff", batch_size=n)
t = time.time(); ig = attribute(m, data, AttributionSpec(ig_steps=5, batch_size=n)); print("EAP-IG s", round(time.time() - t, 1), flush=True)
eap = attribute(m, data, AttributionSpec(method="EAP", batch_size=n))
g = ig.graph
k10 = round(0.1 * g.n_edges)
print("edges", g.n_edges, "10% =", k10, "faithfulness@10% EAP-IG", round(ev.faithfulness(top_n(ig, k10)), 3), "EAP", round(ev.faithfulness(top_n(eap, k10)), 3), flush=True)
cur = faithfulness_curve(ev, ig); print("EAP-IG curve", [round(f, 3) for f in cur.faithfulness], "CPR", round(cur.cpr, 3), "CMD", round(cur.cmd, 3), flush=True)
t = time.time(); ex = attribute(m, data, AttributionSpec(method="exact", batch_size=n)); print("exact s", round(time.time() - t, 1), flush=True)
real = g.real_edge_mask
def r(a, b): return float(torch.corrcoef(torch.stack([a[real].double(), b[real].double()]))[0, 1])
print("Pearson vs exact: EAP-IG", round(r(ig.edges, ex.edges), 3), "EAP", round(r(eap.edges, ex.edges), 3), flush=True)
print("Pearson |.| vs |exact|: EAP-IG", round(r(ig.edges.abs(), ex.edges.abs()), 3), "EAP", round(r(eap.edges.abs(), ex.edges.abs()), 3), flush=True)
