"""The web UI's protocol module (openmoshi/serving/web/protocol.js) agrees with openmoshi/serving/protocol.py and
with the query parameters the client and server use."""

import re
from pathlib import Path

from openmoshi.serving import client
from openmoshi.serving import protocol
from openmoshi.serving import params

WEB = Path(__file__).resolve().parent.parent / "openmoshi" / "serving" / "web"


def _js_constants() -> dict[str, object]:
    text = (WEB / "protocol.js").read_text()
    consts = {name: int(value) for name, value in re.findall(r"export const (\w+) = (\d+);", text)}
    params = re.search(r"export const QUERY_PARAMS = \[(.*?)\];", text, re.S).group(1)
    consts["QUERY_PARAMS"] = re.findall(r'"(\w+)"', params)
    return consts


def test_kinds_and_controls_agree():
    js = _js_constants()
    py = {name: getattr(protocol, name) for name in dir(protocol) if name.startswith(("KIND_", "CONTROL_"))
          and isinstance(getattr(protocol, name), int)}
    assert py, "no constants found in openmoshi/serving/protocol.py"
    assert {k: v for k, v in js.items() if k.startswith(("KIND_", "CONTROL_"))} == py


def test_query_params_agree():
    js = _js_constants()["QUERY_PARAMS"]
    assert js == list(client.SAMPLING_PARAMS) + [client.AUTH_PARAM]
    # Every setting the UI sends is one the server reads (applied or validated).
    known = set(params.SAMPLING_PARAMS) | set(params.SEED_PARAMS) | {"worker_auth_id"}
    assert set(js) <= known


def test_queue_metadata_keys_agree():
    text = (WEB / "protocol.js").read_text()
    js = dict(re.findall(r'export const (QUEUE_\w+) = "(\w+)";', text))
    assert js == {"QUEUE_POSITION": protocol.QUEUE_POSITION, "QUEUE_LENGTH": protocol.QUEUE_LENGTH}


def test_audio_constants_agree():
    js = _js_constants()
    assert js["SAMPLE_RATE"] == client.SAMPLE_RATE == 24000
    assert js["FRAME_SIZE"] == client.FRAME_SIZE == 1920


def test_web_files_are_packaged():
    for name in ("index.html", "app.js", "protocol.js", "ogg.js", "worklets.js", "jitter.js", "latency.js", "style.css"):
        assert (WEB / name).is_file(), name
    html = (WEB / "index.html").read_text()
    assert 'src="app.js"' in html and 'href="style.css"' in html  # relative: works under any prefix
