"""eapcore: Edge Attribution Patching with Integrated Gradients on TransformerLens 4.x.

The public API in one place (``from eapcore import load_model, attribute, ...``); each name lives in
the module named in the import below it.
"""

__version__ = "0.1.0"

from eapcore.attribute import AttributionSpec, attribute
from eapcore.circuit import Circuit, Scores
from eapcore.curve import faithfulness_curve
from eapcore.data import PromptPairs, tokenize
from eapcore.evaluate import CircuitEvaluator
from eapcore.export import load_circuit, save_json, save_pt
from eapcore.graph import Graph
from eapcore.methods import LEVELS, METHODS
from eapcore.models import ModelSpec, load_model
from eapcore.select import by_nodes, greedy, prune, threshold, top, top_n
from eapcore.tasks import TASKS, get_task
from eapcore.threads import configure_threads

__all__ = [
    "AttributionSpec", "attribute", "Circuit", "Scores", "PromptPairs", "tokenize", "CircuitEvaluator",
    "faithfulness_curve", "load_circuit", "save_json", "save_pt", "Graph", "LEVELS", "METHODS", "ModelSpec",
    "load_model", "by_nodes", "greedy", "prune", "threshold", "top", "top_n", "TASKS", "get_task",
    "configure_threads",
]
