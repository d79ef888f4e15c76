"""What several test modules share (test modules do not import each other): tiny random models of every
verified family and prompt pairs, built locally (no network); the devices engine tests run on; the toy
pairs; app, browser, file and hook helpers.

Devices: the engine fixtures (``tiny64``, ``tiny32``) put their model on ``device``, which is ``cpu``
unless a test is marked ``devices``: such a test runs once on ``cpu`` and once on ``cuda`` (that case is
marked ``cuda``, so ``pytest -m cuda`` selects it and it skips itself without a GPU). TF32 is off, as it
is by default for matrix products, so float32 results on a GPU keep float32's precision.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the test models are tiny: threads only add contention
torch.backends.cuda.matmul.allow_tf32 = False  # the float32 tests compare to 1e-4..1e-6
torch.backends.cudnn.allow_tf32 = False

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``devices`` runs once per entry of :data:`DEVICES` (its ``device`` and the engine fixtures)."""
    if metafunc.definition.get_closest_marker("devices") and "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, indirect=True, scope="module")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip themselves where there is no CUDA device."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


def cuda_devices(n: int = 1) -> None:
    """Skip unless this machine has ``n`` CUDA devices (for a ``cuda``-marked test that needs several)."""
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA devices, this machine has {torch.cuda.device_count()}")


def tiny_tokenizer():
    """The word-level tokenizer of the tiny models: ``<|endoftext|>`` (BOS/EOS, id 0), ``<unk>``, ``<pad>``, a-l."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>"
    )


def save_with_tiny_tokenizer(path: Path, hf_model) -> Path:
    """``save_pretrained`` any Hugging Face causal LM (vocabulary of at least 15) with :func:`tiny_tokenizer`."""
    hf_model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, n_layer: int = 2, n_head: int = 2, n_embd: int = 8, seed: int = 0) -> Path:
    """A random ``GPT2LMHeadModel`` and a word-level tokenizer, written with ``save_pretrained``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=len(tiny_tokenizer()), n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so that scores are not all tiny
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return save_with_tiny_tokenizer(path, model)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def device(request: pytest.FixtureRequest) -> str:
    """Where the engine fixtures' models live: ``cpu``, or each of :data:`DEVICES` for a ``devices`` test."""
    return getattr(request, "param", "cpu")


_LOADED: dict[tuple[str, str, str], object] = {}


def loaded(path: Path, dtype: str, device: str):
    """``load_model(path)`` once per (folder, dtype, device) for the whole session."""
    from eapcore.models import load_model

    key = (str(path), dtype, device)
    if key not in _LOADED:
        _LOADED[key] = load_model(str(path), device=device, dtype=dtype)
    return _LOADED[key]


@pytest.fixture(scope="module")
def tiny64(tiny_dir: Path, device: str):
    return loaded(tiny_dir, "float64", device)


@pytest.fixture(scope="module")
def tiny32(tiny_dir: Path, device: str):
    return loaded(tiny_dir, "float32", device)


@pytest.fixture(scope="session")
def pairs():
    """Eight pairs of mixed lengths (so batches are padded)."""
    from eapcore.data import PromptPairs

    clean = ["a b c d", "b c d e f", "c d e", "d e f g h i", "e f g h", "a c e g", "b d f h j", "c a b"]
    corrupted = ["e b c d", "a c d e f", "f d e", "a e f g h i", "b f g h", "i c e g", "k d f h j", "l a b"]
    correct = ["e", "g", "f", "j", "i", "i", "l", "c"]
    incorrect = ["a", "b", "c", ["d", "e"], "f", "g", "h", "i"]
    return PromptPairs.from_lists(clean, corrupted, correct, incorrect)


# ----- tiny models of each family (tests/test_families.py, tests/test_inspection.py) -----

V = 3 + len(WORDS) + 1  # the tiny tokenizer's vocabulary and one id more
TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=2)
BASE = dict(
    vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=32, **TOKENS,
)
GQA = dict(BASE, num_key_value_heads=2)

# name: (config class, model class, config kwargs, parallel attention/MLP, key/value heads before ungrouping)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32, **TOKENS), False, 4),
    "pythia": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(BASE, rotary_pct=0.5), True, 4),
    "neox-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(BASE, use_parallel_residual=False), False, 4),
    "llama": ("LlamaConfig", "LlamaForCausalLM", GQA, False, 2),
    "mistral": ("MistralConfig", "MistralForCausalLM", GQA, False, 2),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", GQA, False, 2),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(GQA, head_dim=4), False, 2),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(BASE, num_key_value_heads=1, head_dim=4), False, 1),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", GQA, False, 2),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", BASE, False, 4),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", GQA, False, 2),
    "gpt-bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32, multi_query=True, **TOKENS), False, 1),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(GQA, residual_multiplier=0.5, embedding_multiplier=2.0), False, 2),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", GQA, False, 2),
    # post-sublayer norms (sliding windows shorter than the prompts, Gemma-2's soft-capping on)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(GQA, head_dim=4, sliding_window=3), False, 2),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(GQA, head_dim=4, sliding_window=3), False, 2),
    "gemma3-multimodal": ("Gemma3Config", "Gemma3ForConditionalGeneration", dict(
        text_config=dict(GQA, head_dim=4, sliding_window=3), mm_tokens_per_image=4, vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4),
    ), False, 2),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", GQA, False, 2),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(BASE, sliding_window=3), False, 4),
}


def hf_model(config_cls: str, model_cls: str, kwargs: dict, seed: int = 0):
    """A random Hugging Face model of ``model_cls`` with weights larger than the default init (biases and norm
    weights too), so that scores are not tiny; skips where this transformers has no such class."""
    import transformers

    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.3)
    return hf


# ----- the app (tests/test_app.py, tests/test_app_views.py, tests/test_bad_inputs.py, tests/test_browser.py) -----

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `ui` lives next to app.py
    sys.path.insert(0, str(ROOT))
APP = str(ROOT / "app.py")
TOY = {  # the prompt pairs of the ``pairs`` fixture, as CSV columns
    "clean": ["a b c d", "b c d e f", "c d e", "d e f g h i", "e f g h", "a c e g", "b d f h j", "c a b"],
    "corrupted": ["e b c d", "a c d e f", "f d e", "a e f g h i", "b f g h", "i c e g", "k d f h j", "l a b"],
    "correct": ["e", "g", "f", "j", "i", "i", "l", "c"],
    "incorrect": ["a", "b", "c", '["d", "e"]', "f", "g", "h", "i"],
}


def new_app():
    """The app in Streamlit's AppTest, run once."""
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=300).run()


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def metric_value(at, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


def run_attribution(at, open_explore: bool = True, switch: bool = True):
    if switch:
        at.switch_page("pages/attribute.py").run()
    at.checkbox(key="w_open_explore").set_value(open_explore)
    at.button(key="run_attribution").click().run()
    assert errors(at) == []
    if open_explore:  # the run switched to Explore; pin AppTest to that page for the next runs
        assert any(m.label == "Faithfulness" for m in at.metric)
        at.switch_page("pages/explore.py")
    return at


KEPT = ("model_spec", "pairs", "data_label", "metric", "scores", "scores_key", "scores_label")


def app_with_scores():
    """A fresh session that has pairs, a model and scores (the scores are cached after the first run), and
    what it holds of them (:data:`KEPT`)."""
    at = run_attribution(new_app(), open_explore=False)
    return at, {key: at.session_state[key] for key in KEPT}


def assert_kept(at, before: dict, *changed: str) -> None:
    """The session still holds what ``before`` recorded (except ``changed``); no run is left marked running."""
    from ui.state import RUNNING

    assert not at.exception, at.exception
    for key, value in before.items():
        if key not in changed:
            assert at.session_state[key] is value, f"the session lost its {key}"
    assert RUNNING not in at.session_state and not [b for b in at.button if b.label == "Cancel"]


def one_error(at, message: str) -> str:
    """The one error the page shows, which matches the regex ``message``."""
    found = errors(at)
    assert len(found) == 1 and re.search(message, found[0]), found
    return found[0]


APP_PAIRS = 16  # the first pairs of the IOI task that the app tests open with


def demo_available() -> bool:
    from eapcore.models import DEMO_MODEL_DIR
    from eapcore.tasks import TASKS

    return (DEMO_MODEL_DIR / "config.json").exists() and TASKS["ioi"].csv.exists()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(model name, CSV path) the app opens with (the demo model and the first IOI pairs, else the tiny
    model and the toy pairs); environment variables point the app at them."""
    import pandas as pd

    from eapcore.tasks import TASKS

    tmp = tmp_path_factory.mktemp("app")
    if demo_available():
        model = "demo"
        frame = pd.read_csv(TASKS["ioi"].csv, dtype=str, keep_default_na=False).head(APP_PAIRS)
    else:
        model = str(save_tiny_gpt2(tmp / "tiny"))
        frame = pd.DataFrame(TOY)
    csv = tmp / "pairs.csv"
    frame.to_csv(csv, index=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("EAPCORE_APP_MODEL", model)
    mp.setenv("EAPCORE_APP_DATA", str(csv))
    mp.setenv("EAPCORE_APP_DEVICE", "cpu")
    yield model, csv
    mp.undo()


@pytest.fixture(scope="module")
def engine(setup):
    """The same model and data as the app's, loaded by eapcore directly (the independent reference)."""
    from eapcore.data import PromptPairs, tokenize
    from eapcore.models import ModelSpec, load_model

    model_name, csv = setup
    model = load_model(ModelSpec(model_name, "cpu", "float32"))
    data = tokenize(PromptPairs.from_csv(csv), model.tokenizer, model.cfg.n_ctx)
    return model, data


def attached_hooks(model) -> int:
    """Forward and backward hooks attached to the model's hook points now."""
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


# ----- the command line (tests/test_bad_inputs.py, tests/test_device_errors.py) -----


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """(exit code, last line on stderr) of ``python -m eapcore ARGS --device cpu``, run in this process."""
    from eapcore.cli import main

    capsys.readouterr()
    code = main([*args, "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def cli_error(capsys: pytest.CaptureFixture, message: str, *args: str) -> None:
    """The command fails with exit status 2 and one ``eapcore COMMAND: error:`` line matching ``message``."""
    code, line = cli(capsys, *args)
    assert code == 2 and line.startswith(f"eapcore {args[0]}: error: "), (code, line)
    assert re.search(message, line), line


# ----- the browser (tests/test_browser.py, tests/test_browser_inspect.py, tests/test_benchmarks.py) -----

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 180_000

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the browser fixture (a failure under CI=true)
    expect = sync_playwright = None


def require(ok: bool, why: str) -> None:
    """Skip unless ``ok``; with CI=true fail instead (the browser test must run there)."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: the browser test must run; .ci/run installs Debian's chromium)")
        pytest.skip(why)


@pytest.fixture
def server(tmp_path: Path):
    """`streamlit run app.py` on a free port of 127.0.0.1 (the tiny model when the demo is missing); stopped at the end."""
    import pandas as pd

    from ui import server as app_server

    env = {}
    if not demo_available():
        env["EAPCORE_APP_MODEL"] = str(save_tiny_gpt2(tmp_path / "tiny"))
        pd.DataFrame(TOY).to_csv(tmp_path / "toy.csv", index=False)
        env["EAPCORE_APP_DATA"] = str(tmp_path / "toy.csv")
    log = tmp_path / "streamlit.log"
    with app_server.running(env, log) as url:
        yield url, log


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("EAPCORE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Browser:
    """A Chromium page on the app's server; ``outside`` collects requests that left 127.0.0.1."""

    page: Any
    url: str
    log: Path
    outside: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.outside == [], f"the app fetched resources from outside: {self.outside}"
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]


@pytest.fixture
def chromium(server):
    """Opens pages on the app's server: ``open(width, height, scheme, link)`` -> :class:`Browser` (``scheme`` is
    the browser's colour scheme, which the app's theme follows). Without ``link`` the page opens on the app's
    root and waits for the default model and task; with one (a path and query, e.g. ``/explore?run=...``) it
    opens that URL of the server in a new browser context, as a link would."""
    require(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM}")
    require(sync_playwright is not None, "the playwright package is not installed")
    expect.set_options(timeout=TIMEOUT_MS)
    url, log = server
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)

        def open_page(width: int = 1440, height: int = 1000, scheme: str = "light", link: str | None = None) -> Browser:
            context = chromium.new_context(viewport={"width": width, "height": height}, color_scheme=scheme,
                                           accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            b = Browser(page, url, log)
            page.on("request", lambda r: b.outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")) else None)
            page.goto(url + (link or ""))
            if link is None:
                expect(page.get_by_text("graph edges")).to_be_visible()  # the default model loaded
                expect(page.get_by_text("Data ready")).to_be_visible()  # and the default task
            return b

        try:
            yield open_page
        finally:
            chromium.close()


@pytest.fixture
def browser(chromium):
    return chromium()


# ----- circuit files (tests/test_export.py, tests/test_bad_inputs.py) -----


class Evil:
    """Unpickling this would run ``action`` (create the marker file)."""

    def __init__(self, action: str, marker: Path) -> None:
        self.action, self.marker = action, marker

    def __reduce__(self):
        if self.action == "system":
            return os.system, (f"touch {self.marker}",)
        return open, (str(self.marker), "w")


def edit(data: dict, change: str) -> None:
    """Break a ``.pt`` payload in one way."""
    if change == "missing key":
        del data["edges_in_graph"]
    elif change == "non-real cell":
        data["edges_in_graph"][-1, 0] = True  # the last MLP reading a layer-0 column: backwards in time
    elif change == "names":
        data["src_nodes"][1] = "a0.h9"
    elif change == "shape":
        data["nodes_in_graph"] = data["nodes_in_graph"][:-1]
    elif change == "dtype":
        data["edges_in_graph"] = data["edges_in_graph"].float()
    elif change == "cfg":
        data["cfg"]["n_layers"] = "2"


def json_edit(data: dict, change: str) -> None:
    """Break a ``.json`` payload in one way."""
    edges = data["edges"]
    if change == "missing edge":
        del edges["a0.h1->m0"]
    elif change == "unknown edge":
        edges["a0.h0->a9.h0<q>"] = {"score": 0.0, "in_graph": False}
    elif change == "backwards edge":
        edges["m1->a0.h0<q>"] = {"score": 0.0, "in_graph": False}
    elif change == "score type":
        edges["input->m0"]["score"] = "0.5"
    elif change == "in_graph type":
        edges["input->m0"]["in_graph"] = 1
    elif change == "node type":
        data["nodes"]["m0"]["in_graph"] = "yes"
    elif change == "missing node":
        del data["nodes"]["m1"]
    elif change == "partial node scores":
        del data["nodes"]["m1"]["score"]
    elif change == "no edges":
        del data["edges"]


# ----- small files and plain-Python statistics (tests/test_cli.py, test_verify.py, test_compare.py, ...) -----

CSV = "clean,corrupted,correct,incorrect\n" + "\n".join(
    f"{c},{k},{a},{b}"
    for c, k, a, b in [("a b c d", "e b c d", "e", "a"), ("b c d e f", "a c d e f", "g", "b"), ("c d e", "f d e", "f", "c")]
)


def plain_pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5


def plain_ranks(values: list[float]) -> list[float]:
    """1 for the smallest; ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return out
