"""fastavro's Parsing Canonical Form and CRC-64-AVRO fingerprint of schemas, as the oracle of
dualsync's own (tests/it/interop.rs).

stdin:  {"schemas_dir": DIR, "schemas": [<schema JSON text>, ...]}
stdout: {"forms": [{"pcf": ..., "fingerprint": <hex, wire byte order>} | {"error": ...}, ...],
         "writers": {<label>: <hex>}}   # what consume_single_object.py resolves from DIR
"""

import json
import os
import sys

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from consume_single_object import writer_schemas  # noqa: E402


def form(text: str) -> dict:
    try:
        pcf = to_parsing_canonical_form(parse_schema(json.loads(text)))
    except Exception as e:  # a schema fastavro refuses is reported, not fatal
        return {"error": repr(e)}
    return {"pcf": pcf, "fingerprint": fingerprint(pcf, "CRC-64-AVRO")}


def main() -> None:
    request = json.load(sys.stdin)
    writers = writer_schemas(request["schemas_dir"])
    json.dump({
        "forms": [form(text) for text in request["schemas"]],
        "writers": {label: fp.hex() for fp, (label, _) in writers.items()},
    }, sys.stdout)


if __name__ == "__main__":
    main()
