"""``vlmtune view`` in a real browser: headless Chromium (Debian's package) driven by Selenium.

One server per page kind and one browser for the module. The references are independent of the view's code: the
records' own reply strings and the template's end token, the processor's own count of image pads, ``check-data``'s
printed problem lines, the run files written here by hand. Without Chromium, chromedriver or Selenium the tests
skip with one line saying why (``scripts/setup.sh`` installs them as root).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import EXAMPLES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
IM_END = "<|im_end|>"  # the end-of-turn token the Qwen chat templates write after every reply
WAIT_S = 30  # upper bound on waiting for the page to show something (the tests wait on conditions, not on time)

RECORDS = [
    {"id": "two_turns", "image": str(EXAMPLES / "images/red_circle.png"), "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is this?"}, {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "It is red, bright red."}]},
    {"id": "two_images_one_file", "image": str(EXAMPLES / "images/blue_square.png"), "conversations": [
        {"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "Yes."}]},
    {"id": "text_only", "conversations": [
        {"from": "human", "value": "How many sides has a triangle?"}, {"from": "gpt", "value": "Three."}]},
]


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "headless Chromium not found (chromium, chromedriver): scripts/setup.sh installs them as root"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        pytest.skip(f"browser tests skipped: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the page replaces its nodes when it redraws: a node read during a redraw is read again
    return WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def _open(driver, address: str) -> None:
    """Load the page anew: a URL that differs from the current one by its hash alone would only change the hash,
    and the previous page's nodes would still be there while the new ones load."""
    driver.get("about:blank")
    driver.get(address)


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _status(address: str) -> int:
    try:
        with urllib.request.urlopen(address) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _serve(site):
    from vlmtune.view.server import serve_in_thread

    server, url = serve_in_thread(site)
    assert server.server_address[0] == "127.0.0.1"  # the default binding: this machine only
    return server, url


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("view-data") / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def data_site(data_file, tiny_model_dir):
    from vlmtune.view import build_parser, open_site

    site = open_site(build_parser().parse_args([str(data_file), "--model", str(tiny_model_dir())]))
    server, url = _serve(site)
    yield site, url
    server.shutdown()


def _trained_text(driver) -> str:
    return "".join(n.get_attribute("textContent") for n in _css(driver, ".tokens .tok.trained")).replace("\u21b5", "")


def test_record_page_highlights_exactly_the_replies_and_follows_the_label_mode(browser, data_site, tmp_path):
    _, url = data_site
    _open(browser, url + "/#/")
    _wait(browser, lambda d: len(_css(d, "tr.row")) == len(RECORDS))
    _css(browser, 'tr.row[data-index="0"]')[0].click()
    _wait(browser, lambda d: _css(d, ".tokens .tok.trained"))
    replies = [turn["value"] for turn in RECORDS[0]["conversations"] if turn["from"] == "gpt"]
    assert _trained_text(browser) == "".join(reply + IM_END for reply in replies)
    browser.save_screenshot(str(tmp_path / "record.png"))

    from selenium.webdriver.support.ui import Select

    Select(_css(browser, "#label_mode")[0]).select_by_value("last_assistant")
    _wait(browser, lambda d: "label_mode=last_assistant" in d.current_url and _css(d, ".tokens .tok.trained")
          and _trained_text(d) != "".join(reply + IM_END for reply in replies))
    assert _trained_text(browser) == replies[-1] + IM_END
    # the first reply is still marked as a reply, untrained
    untrained = _css(browser, ".tokens .tok.reply:not(.trained)")
    assert replies[0] in "".join(n.get_attribute("textContent") for n in untrained)
    token = _css(browser, ".tokens .tok.trained")[0]
    token.click()
    detail = _css(browser, ".detail")[0].text
    assert "label" in detail and "position (t, h, w)" in detail


def test_vision_block_shows_the_processors_count_of_image_pads(browser, data_site, tiny_model_dir, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir())
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with Image.open(RECORDS[0]["image"]) as image:
        text = "<|vision_start|><|image_pad|><|vision_end|>"
        ids = processor(text=[text], images=[image.convert("RGB")])["input_ids"]
    want = sum(1 for t in ids[0] if t == pad_id)
    assert want > 1

    _, url = data_site
    _open(browser, url + "/#/record/0")
    _wait(browser, lambda d: _css(d, ".vision"))
    blocks = _css(browser, ".vision[data-kind]")
    assert len(blocks) == 1
    assert int(blocks[0].get_attribute("data-count")) == want
    assert f"{want} tokens" in blocks[0].text
    # the image itself is shown, served from the data's own file
    image = _css(browser, ".medium img")[0]
    _wait(browser, lambda d: image.get_attribute("naturalWidth") not in (None, "0"))
    with Image.open(RECORDS[0]["image"]) as original:
        assert int(image.get_attribute("naturalWidth")) == original.width
    browser.save_screenshot(str(tmp_path / "vision.png"))


def test_a_bad_record_shows_the_problem_check_data_prints(browser, data_site, data_file, tiny_model_dir, capsys,
                                                          tmp_path):
    from vlmtune.cli import main

    assert main(["check-data", str(data_file), "--model", str(tiny_model_dir())]) == 1
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR:")]
    assert len(printed) == 1 and "two_images_one_file" in printed[0]

    _, url = data_site
    _open(browser, url + "/#/?problems=1")
    _wait(browser, lambda d: _css(d, "#count") and _css(d, "#count")[0].text.startswith("1 record"))
    _css(browser, "tr.row")[0].click()
    _wait(browser, lambda d: _css(d, "#record-title") and "two_images_one_file" in _css(d, "#record-title")[0].text)
    assert [n.text for n in _css(browser, "#problems .problem")] == printed
    browser.save_screenshot(str(tmp_path / "bad.png"))


def test_search_finds_records_by_text_and_id_case_insensitively(browser, data_site):
    _, url = data_site
    for query, ids in (("BRIGHT red", ["two_turns"]), ("text_ONLY", ["text_only"]), ("no such words", [])):
        _open(browser, url + "/#/")
        _wait(browser, lambda d: _css(d, 'input[name="q"]'))
        box = _css(browser, 'input[name="q"]')[0]
        box.send_keys(query)
        box.submit()
        shown = f"{len(ids)} record"
        _wait(browser, lambda d, shown=shown: _css(d, "#count") and _css(d, "#count")[0].text.startswith(shown))
        assert [n.text for n in _css(browser, "td.rid")] == ids


def test_only_files_the_data_refers_to_are_served(browser, data_site, data_file, tmp_path):
    from urllib.parse import quote

    _, url = data_site

    def status(path: str) -> int:
        return _status(f"{url}/file?path={quote(path)}")

    assert status(str(Path(RECORDS[0]["image"]).resolve())) == 200
    assert status(str(data_file)) == 403  # the data file itself is no medium of it
    assert status("/etc/passwd") == 403
    assert status(str(EXAMPLES / "images/scene.png")) == 403  # an image beside, not referred to
    assert status(str(EXAMPLES / "images/../images/red_circle.png")) == 200  # the same file, spelled otherwise
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/static/../../cli.py")
    assert refused.value.code == 404
    _open(browser, f"{url}/file?path=/etc/passwd")
    assert "root:" not in browser.page_source
    browser.save_screenshot(str(tmp_path / "refused.png"))


# ---------------------------------------------------------------- the run page

LOG = [{"step": s, "loss": 2.0 / s, "grad_norm": 1.0 + s / 10, "learning_rate": 1e-4 * (1 - s / 10),
        "tokens_per_s": 100.0 + s} for s in range(1, 5)] + [{"step": 4, "eval_loss": 0.9}]
PREDICTIONS = [  # written as vlmtune eval writes them; the second disagrees most
    {"id": "a", "prompt": "?", "reference": "A red circle.", "prediction": "A red circle.",
     "metrics": {"exact_match": 1.0, "token_f1": 1.0}},
    {"id": "b", "prompt": "?", "reference": "A blue square.", "prediction": "green",
     "metrics": {"exact_match": 0.0, "token_f1": 0.0}},
    {"id": "c", "prompt": "?", "reference": "Three.", "prediction": "Three sides.",
     "metrics": {"exact_match": 0.0, "token_f1": 0.67}},
]


@pytest.fixture(scope="module")
def run_site(tmp_path_factory):
    from vlmtune.view.run_pages import RunView

    folder = tmp_path_factory.mktemp("view-run")
    (folder / "log_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in LOG))
    (folder / "vlmtune_run.json").write_text(json.dumps({"stage": "sft", "base_model": "tiny", "family": "qwen2_vl"}))
    (folder / "eval_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PREDICTIONS))
    server, url = _serve(RunView(folder))
    yield folder, url
    server.shutdown()


def test_run_page_plots_what_was_logged_and_lists_predictions_by_disagreement(browser, run_site, tmp_path):
    folder, url = run_site
    _open(browser, url + "/")
    _wait(browser, lambda d: _css(d, "svg.plot"))
    titles = [p.get_attribute("data-title") for p in _css(browser, "svg.plot")]
    assert titles == ["training loss", "eval loss", "learning rate", "grad norm", "tokens / s"]  # panels with data only
    loss = _css(browser, 'svg.plot[data-title="training loss"] path[data-key="loss"]')[0]
    assert loss.get_attribute("d").count("L") == len([e for e in LOG if "loss" in e]) - 1
    ids = [row.find_elements("css selector", "td")[1].text for row in _css(browser, "tr.prediction")]
    assert ids == ["b", "c", "a"]
    assert "qwen2_vl" in _css(browser, "#facts")[0].text
    browser.save_screenshot(str(tmp_path / "run.png"))

    # the page follows a run that is still training: a new log line shows without reloading
    with (folder / "log_history.jsonl").open("a") as log:
        log.write(json.dumps({"step": 5, "loss": 0.3, "grad_norm": 1.5}) + "\n")
    _wait(browser, lambda d: _css(d, "#log-count") and _css(d, "#log-count")[0].text.startswith("5 training"))
    loss = _css(browser, 'svg.plot[data-title="training loss"] path[data-key="loss"]')[0]
    assert loss.get_attribute("d").count("L") == 4


# ---------------------------------------------------------------- DPO pairs and grounding boxes


@pytest.fixture(scope="module")
def open_view(tiny_model_dir):
    """Serve a data file under flags as `vlmtune view` takes them; every server stops with the module."""
    from vlmtune.view import build_parser, open_site

    servers = []

    def serve(*argv: str) -> str:
        site = open_site(build_parser().parse_args([*argv, "--model", str(tiny_model_dir())]))
        server, url = _serve(site)
        servers.append(server)
        return url

    yield serve
    for server in servers:
        server.shutdown()


def test_dpo_pairs_show_chosen_and_rejected_side_by_side(browser, open_view, tmp_path):
    pair = json.loads((EXAMPLES / "preference.json").read_text())[0]
    url = open_view(str(EXAMPLES / "preference.json"), "--stage", "dpo")
    _open(browser, url + "/#/record/0")
    _wait(browser, lambda d: len(_css(d, ".pair > .sequence")) == 2)
    for name in ("chosen", "rejected"):
        tokens = _css(browser, f'.sequence[data-name="{name}"] .tokens .tok.trained')
        assert "".join(n.get_attribute("textContent") for n in tokens) == pair[name] + IM_END
    browser.save_screenshot(str(tmp_path / "dpo.png"))


def _rewards_shown(driver) -> list[tuple]:
    return [(r.get_attribute("data-name"), float(r.get_attribute("data-weight")),
             *[c.text for c in r.find_elements("css selector", "td.call")]) for r in _css(driver, "#rewards tr.reward")]


def test_grpo_prompts_and_runs_show_their_reward_settings(browser, open_view, tmp_path):
    """A GRPO data view takes grpo's reward flags: each prompt lists the functions that will score it, their
    weights and the arguments they get from this record (its fields and id), and a field one reads that the record
    lacks is a problem of the record; a GRPO run's page shows the settings its vlmtune_run.json recorded."""
    from vlmtune.stage_config import GRPOArguments
    from vlmtune.view.run_pages import RunView

    prompts = json.loads((EXAMPLES / "grpo.json").read_text())
    (tmp_path / "my_rewards.py").write_text("def near_box(completions, box):\n    return [0.0 for _ in completions]\n")
    url = open_view(str(EXAMPLES / "grpo.json"), "--stage", "grpo", "--reward_funcs", "exact_match", "similarity",
                    f"{tmp_path / 'my_rewards.py'}:near_box", "--reward_weights", "2", "0.5", "1",
                    "--num_generations", "6")
    _open(browser, url + "/#/record/1")
    _wait(browser, lambda d: _css(d, "#rewards tr.reward"))
    # the built-ins take **kwargs: every field of the record, and its id as record_id
    call = f'(completions, answer={json.dumps(prompts[1]["answer"])}, record_id={json.dumps(prompts[1]["id"])})'
    mine = f"{tmp_path / 'my_rewards.py'}:near_box"
    assert _rewards_shown(browser) == [("exact_match", 2.0, "exact_match" + call),
                                       ("similarity", 0.5, "similarity" + call),
                                       (mine, 1.0, mine + "(completions, box=<missing>)")]
    assert "--num_generations 6" in _css(browser, "#reward-settings")[0].text
    problems = [p.text for p in _css(browser, "#problems .problem")]
    assert len(problems) == 1 and "'box'" in problems[0] and prompts[1]["id"] in problems[0]
    browser.save_screenshot(str(tmp_path / "grpo-prompt.png"))

    folder = tmp_path / "grpo-run"  # vlmtune_run.json as a GRPO run writes it: the stage's flags under "grpo"
    folder.mkdir()
    flags = GRPOArguments(reward_funcs=["similarity", "exact_match"], reward_weights=[1.0, 3.0], num_generations=6)
    (folder / "vlmtune_run.json").write_text(json.dumps({"stage": "grpo", "grpo": dataclasses.asdict(flags)}))
    server, url = _serve(RunView(folder))
    try:
        _open(browser, url + "/")
        _wait(browser, lambda d: _css(d, "#rewards tr.reward"))
        assert _rewards_shown(browser) == [("similarity", 1.0), ("exact_match", 3.0)]
        assert "--num_generations 6" in _css(browser, "#reward-settings")[0].text
        browser.save_screenshot(str(tmp_path / "grpo-run.png"))
    finally:
        server.shutdown()


def test_grounding_boxes_are_drawn_in_original_pixels(browser, open_view, tmp_path):
    record = json.loads((EXAMPLES / "grounding.json").read_text())[0]
    assert record["box_format"] == "pixel_original"
    written = json.loads(record["conversations"][1]["value"])["bbox_2d"]  # the box as the record writes it
    url = open_view(str(EXAMPLES / "grounding.json"))
    _open(browser, url + "/#/record/0")
    _wait(browser, lambda d: _css(d, ".medium svg.boxes rect"))
    rect = _css(browser, ".medium svg.boxes rect")[0]
    x, y = float(rect.get_attribute("x")), float(rect.get_attribute("y"))
    w, h = float(rect.get_attribute("width")), float(rect.get_attribute("height"))
    # the family's convention (norm1000 for the tiny Qwen2-VL) rounds: back in pixels within half a pixel
    assert [x, y, x + w, y + h] == pytest.approx(written, abs=0.5)
    browser.save_screenshot(str(tmp_path / "grounding.png"))


def test_a_grounding_prediction_is_drawn_against_its_reference_box(browser, tmp_path, tiny_model_dir):
    """An eval prediction line as eval writes it (prediction_lines over grounding.json's first record) shows the
    record's image with the predicted and the reference box at their original pixels."""
    from urllib.parse import quote

    from vlmtune.data import media
    from vlmtune.data.records import load_records
    from vlmtune.generation import prediction_lines, score
    from vlmtune.model.load import load_family, load_processor
    from vlmtune.view.run_pages import RunView

    model_dir = str(tiny_model_dir())
    fam = load_family(model_dir)
    budget = media.budget_from_processor(load_processor(model_dir), fam.factor)
    circle = load_records(EXAMPLES / "grounding.json", budget=budget, min_image_side=fam.factor,
                          box_target=fam.box_format, box_format=None)[0]
    assert circle.id == "ground_red_circle"  # its box, as grounding.json writes it: [24, 14, 72, 58] on 96 x 72
    reference, predicted = [24, 14, 72, 58], [36, 14, 84, 58]  # the prediction: moved right by 12 px
    g = circle.boxes[0].geometry
    if fam.box_format == "pixel_resized":
        sx, sy = g.resized_width / 96, g.resized_height / 72
        reply = f'{{"bbox_2d": [{round(36 * sx)}, {round(14 * sy)}, {round(84 * sx)}, {round(58 * sy)}]}}'
    else:  # norm1000: x / 96 * 1000, y / 72 * 1000
        reply = '{"bbox_2d": [375, 194, 875, 806]}'
    lines = prediction_lines([circle], [reply], score([circle], [reply], fam, budget))
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "eval_predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    server, url = _serve(RunView(folder))
    try:
        image = EXAMPLES / "images/red_circle.png"
        assert _status(url + "/file?path=" + quote(str(image))) == 200  # the image the prediction line names
        assert _status(url + "/file?path=" + quote(str(EXAMPLES / "images/blue_square.png"))) == 403  # not named
        _open(browser, url + "/")
        _wait(browser, lambda d: _css(d, ".grounding svg.boxes rect.pred-box") and _css(d, "rect.ref-box"))
        assert _css(browser, ".grounding img")[0].get_attribute("naturalWidth") == "96"
        for selector, expected in (("rect.pred-box", predicted), ("rect.ref-box", reference)):
            rect = _css(browser, ".grounding svg.boxes " + selector)[0]
            x, y = float(rect.get_attribute("x")), float(rect.get_attribute("y"))
            w, h = float(rect.get_attribute("width")), float(rect.get_attribute("height"))
            assert [x, y, x + w, y + h] == pytest.approx(expected, abs=0.5), selector
        colours = {_css(browser, "rect." + c)[0].get_attribute("stroke") for c in ("pred-box", "ref-box")}
        assert len(colours) == 2
        browser.save_screenshot(str(tmp_path / "grounding-prediction.png"))
    finally:
        server.shutdown()


def test_eval_compare_folder_shows_both_models_by_name(browser, tmp_path):
    from vlmtune.view.run_pages import RunView

    folder = tmp_path / "eval"
    folder.mkdir()
    first = [{**p, "prediction": p["reference"], "metrics": {"exact_match": 1.0}} for p in PREDICTIONS]
    second = PREDICTIONS
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in first))
    (folder / "predictions_compare.jsonl").write_text("".join(json.dumps(p) + "\n" for p in second))
    (folder / "metrics.json").write_text(json.dumps({"models": {"base": {}, "tuned": {}}}))
    server, url = _serve(RunView(folder))
    try:
        _open(browser, url + "/")
        _wait(browser, lambda d: _css(d, "tr.prediction"))
        head = [th.text for th in _css(browser, "#predictions th")]
        assert head[4] == "base prediction" and head[6] == "tuned prediction"
        rows = {r.find_elements("css selector", "td")[1].text: r.find_elements("css selector", "td")
                for r in _css(browser, "tr.prediction")}
        assert rows["b"][4].text == "A blue square." and rows["b"][6].text == "green"
        browser.save_screenshot(str(tmp_path / "compare.png"))
    finally:
        server.shutdown()


def _png(size: tuple[int, int], colour: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_given_as_bytes_are_shown_from_the_records_own_reference(browser, open_view, tmp_path, _tiny_cache):
    """An image in a Parquet cell and one in a data: URI: shown at their own size, served from the records'
    references (decoded in memory, written nowhere); a made-up reference is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cell, uri = _png((60, 44), "green"), _png((52, 40), "blue")
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]
    table = tmp_path / "cells.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "cell", "messages": turns,
                                          "images": [{"bytes": cell, "path": "green.png"}]}]), table)
    inline = tmp_path / "inline.json"
    inline.write_text(json.dumps([{"id": "uri", "image": "data:image/png;base64," + base64.b64encode(uri).decode(),
                                   "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                     {"from": "gpt", "value": "Blue."}]}]))
    urls = {}
    for path, image, size in ((table, cell, (60, 44)), (inline, uri, (52, 40))):
        url = urls[path.suffix] = open_view(str(path))
        _open(browser, url + "/#/record/0")
        _wait(browser, lambda d: _css(d, ".medium img") and _css(d, ".medium img")[0].get_attribute("naturalWidth")
              not in (None, "0"))
        shown = _css(browser, ".medium img")[0]
        assert (int(shown.get_attribute("naturalWidth")), int(shown.get_attribute("naturalHeight"))) == size
        with urllib.request.urlopen(shown.get_attribute("src")) as answer:
            assert answer.read() == image and answer.headers["Content-Type"] == "image/png"
        assert _css(browser, ".vision[data-kind=image]")  # and it trains: its pads are in the sequence
        browser.save_screenshot(str(tmp_path / f"bytes{path.suffix}.png"))
        assert _status(url + "/api/image?index=0&image=1") == 404  # the record has one image
        assert _status(url + "/api/image?index=1&image=0") == 404  # the file one record
    # references to bytes are no files: the cell's own reference, written as the table reader names it, and made-up
    # ones (another file, a data: URI) are all refused by /file
    digest = hashlib.blake2b(cell, digest_size=12).hexdigest()
    for ref in (f"table:{digest}:0:images/#0:{table}", f"table:{digest}:0:images/#0:/etc/passwd",
                "data:image/png;base64," + base64.b64encode(cell).decode()):
        assert _status(urls[".parquet"] + "/file?path=" + quote(ref)) == 403
    # decoded in memory: neither image's bytes are in any file written beside the data or in the cache (the
    # data stores keep the records' references, not their bytes)
    for file in [f for folder in (tmp_path, _tiny_cache) for f in folder.rglob("*") if f.suffix != ".safetensors"]:
        try:
            found = file.is_file() and file != table and any(image in file.read_bytes() for image in (cell, uri))
        except FileNotFoundError:  # another test's file, gone meanwhile
            continue
        assert not found, file


def test_view_binds_this_machine_by_default_and_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    from vlmtune.cli import main
    from vlmtune.view import build_parser

    assert build_parser().parse_args(["data.json"]).host == "127.0.0.1"
    assert main(["view", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"vlmtune view: error: {tmp_path} is a folder without a training log, vlmtune_run.json or " \
                    "predictions: give a data file or a run folder"
    # GRPO's reward flags belong to GRPO prompts: with another stage they are refused, not ignored
    assert main(["view", str(EXAMPLES / "data.json"), "--reward_funcs", "similarity"]) == 1
    assert capsys.readouterr().err.strip() == "vlmtune view: error: --reward_funcs is a GRPO reward setting: give " \
                                              "it with --stage grpo"
