"""A consumer of dualsync's topics written the way another team would write one.

confluent-kafka (librdkafka) reads the topics and fastavro decodes the values; nothing comes
from dualsync but the schema files: each aggregate's `schemas/<type>.avsc` wrapped in the
envelope `schemas/envelope/envelope.avsc`, and the MongoDB generic envelope
`schemas/envelope/mongo-change.avsc`. Values are Avro single-object encoded (`C3 01`, the
8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form,
then the datum), so the writer schema is found by fastavro's own fingerprint of each schema.

Every message is checked: it decodes with nothing left over, its key equals the envelope's
`aggregate_id`, every `dualsync.*` header equals the envelope field of the same name, and
`op` is DELETE exactly when there is no payload. Reads each partition from the beginning to
the end it had when the run started, then prints a JSON summary on stdout.

    python consume_single_object.py --bootstrap HOST:PORT --schemas DIR TOPIC...
"""

import argparse
import copy
import glob
import io
import json
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

from confluent_kafka import Consumer, TopicPartition
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The envelope fields every dualsync message also carries as a header.
CORE_HEADERS = ["event_id", "event_type", "aggregate_type", "aggregate_id", "version", "created_at"]


def envelope_for(payload: dict, template: dict) -> dict:
    """The envelope around one aggregate's schema, as docs/consumers.md describes it."""
    envelope = copy.deepcopy(template)
    name, namespace = payload["name"], payload.get("namespace")
    if "." in name:
        namespace, name = name.rsplit(".", 1)
    envelope["name"] = name + "Event"
    if namespace:
        envelope["namespace"] = namespace
    for field in envelope["fields"]:
        if field["name"] == "payload":
            field["type"] = ["null", payload]
    return envelope


def crc64_avro(schema: dict) -> bytes:
    """The 8 bytes single-object encoding puts after C3 01 for this (parsed) schema."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def writer_schemas(schemas_dir: str) -> dict:
    """Fingerprint -> (label, parsed writer schema) for every schema dualsync can write."""
    with open(os.path.join(schemas_dir, "envelope", "envelope.avsc")) as f:
        template = json.load(f)
    out = {}
    for path in sorted(glob.glob(os.path.join(schemas_dir, "*.avsc"))):
        with open(path) as f:
            envelope = parse_schema(envelope_for(json.load(f), template))
        out[crc64_avro(envelope)] = (os.path.basename(path)[: -len(".avsc")], envelope)
    with open(os.path.join(schemas_dir, "envelope", "mongo-change.avsc")) as f:
        generic = parse_schema(json.load(f))
    out[crc64_avro(generic)] = ("(mongodb change)", generic)
    return out


def header_text(value) -> str:
    """A header compared as dualsync writes it: UTF-8 text, numbers in decimal."""
    if isinstance(value, datetime):
        return str((value - EPOCH) // timedelta(microseconds=1))
    return str(value)


def check(message, schemas: dict) -> dict:
    """The decoded envelope of one message; raises ValueError saying what is wrong."""
    value = message.value()
    if value is None or value[:2] != SINGLE_OBJECT_MAGIC or len(value) < 10:
        raise ValueError("not single-object encoded")
    known = schemas.get(value[2:10])
    if known is None:
        raise ValueError(f"unknown fingerprint {value[2:10].hex()}")
    label, schema = known
    datum = io.BytesIO(value[10:])
    event = schemaless_reader(datum, schema, None)
    if datum.tell() != len(value) - 10:
        raise ValueError(f"{len(value) - 10 - datum.tell()} bytes left after the datum")
    key = message.key().decode() if message.key() is not None else None
    if key != event["aggregate_id"]:
        raise ValueError(f"key {key!r} != aggregate_id {event['aggregate_id']!r}")
    headers = {k: v.decode() for k, v in (message.headers() or [])}
    for name in CORE_HEADERS:
        if f"dualsync.{name}" not in headers:
            raise ValueError(f"header dualsync.{name} is missing")
    for name, text in headers.items():
        if not name.startswith("dualsync."):
            continue
        field = name.rsplit(".", 1)[1]
        if field == "committed_at":  # no envelope field: when the primary committed (µs)
            if not text.isdigit():
                raise ValueError(f"header {name}={text!r} is not a time in µs")
            continue
        if field not in event:
            raise ValueError(f"header {name} names no envelope field")
        if header_text(event[field]) != text:
            raise ValueError(f"header {name}={text!r} != envelope {event[field]!r}")
    if (event["op"] == "DELETE") != (event["payload"] is None):
        raise ValueError(f"op {event['op']} with payload {event['payload']!r}")
    event["_label"] = label
    return event


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--schemas", required=True, help="dualsync's schemas folder")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")
    parser.add_argument("topics", nargs="+")
    args = parser.parse_args()

    schemas = writer_schemas(args.schemas)
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": f"interop-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    # Read every partition from its start to the end it has now.
    ends, assignment = {}, []
    for topic in args.topics:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            raise SystemExit(f"topic {topic}: {metadata.error}")
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > low:
                ends[(topic, partition)] = high
                assignment.append(TopicPartition(topic, partition, low))
    consumer.assign(assignment)

    summary = {"messages": 0, "decoded": 0, "by_topic": {}, "by_op": {}, "by_schema": {},
               "failures": [], "failure_count": 0, "incomplete_partitions": []}
    deadline = time.monotonic() + args.timeout
    while ends and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error() is not None:
            raise SystemExit(f"consumer error: {message.error()}")
        place = (message.topic(), message.partition())
        summary["messages"] += 1
        summary["by_topic"][place[0]] = summary["by_topic"].get(place[0], 0) + 1
        try:
            event = check(message, schemas)
            summary["decoded"] += 1
            summary["by_op"][event["op"]] = summary["by_op"].get(event["op"], 0) + 1
            label = event["_label"]
            summary["by_schema"][label] = summary["by_schema"].get(label, 0) + 1
        except Exception as e:  # every failure is reported, none stops the count
            summary["failure_count"] += 1
            if len(summary["failures"]) < 20:
                summary["failures"].append({"topic": place[0], "partition": place[1],
                                            "offset": message.offset(), "reason": repr(e)})
        if place in ends and message.offset() + 1 >= ends[place]:
            del ends[place]
    summary["incomplete_partitions"] = [f"{t}/{p}" for t, p in sorted(ends)]
    consumer.close()
    json.dump(summary, sys.stdout, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
