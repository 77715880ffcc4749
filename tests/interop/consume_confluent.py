"""A consumer of dualsync's topics in the Confluent framing, written the way another team would.

confluent-kafka's DeserializingConsumer with its AvroDeserializer: each value's schema id is
resolved at the schema registry (Confluent API) and the value decoded with that writer schema,
by fastavro inside the deserializer. Nothing comes from dualsync: no schema file, no code.

Every message is checked: it decodes, its key equals the envelope's `aggregate_id`, every
`dualsync.*` header equals the envelope field of the same name, and `op` is DELETE exactly
when there is no payload. Reads each partition from the beginning to the end it had when the
run started, then prints a JSON summary on stdout:

    {"messages": N, "decoded": N, "failures": [...], "events": [[topic, key, version], ...]}

    python consume_confluent.py --bootstrap HOST:PORT --registry URL TOPIC...
"""

import argparse
import json
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

from confluent_kafka import DeserializingConsumer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.error import ConsumeError
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import StringDeserializer

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The envelope fields every dualsync message also carries as a `dualsync.<field>` header.
CORE_HEADERS = ["event_id", "event_type", "aggregate_type", "aggregate_id", "version", "created_at"]


def header_text(value) -> str:
    """A header as the producer wrote it: `created_at` in microseconds since the epoch."""
    if isinstance(value, datetime):
        return str((value - EPOCH) // timedelta(microseconds=1))
    return str(value)


def check(message, value) -> list:
    """What is wrong with one decoded message (empty when nothing is)."""
    problems = []
    if message.key() != value["aggregate_id"]:
        problems.append(f"key {message.key()!r} != aggregate_id {value['aggregate_id']!r}")
    headers = {k: v.decode() for k, v in (message.headers() or []) if v is not None}
    for field in CORE_HEADERS:
        expected = header_text(value[field])
        got = headers.get(f"dualsync.{field}")
        if got != expected:
            problems.append(f"header dualsync.{field} {got!r} != envelope {expected!r}")
    if (value["op"] == "DELETE") != (value["payload"] is None):
        problems.append(f"op {value['op']} with payload {value['payload']!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--registry", required=True, help="the registry's Confluent API base URL")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("topics", nargs="+")
    args = parser.parse_args()

    registry = SchemaRegistryClient({"url": args.registry})
    consumer = DeserializingConsumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"interop-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "key.deserializer": StringDeserializer("utf_8"),
            "value.deserializer": AvroDeserializer(registry),
        }
    )
    # Every partition from its start to the end it has now.
    metadata = AdminClient({"bootstrap.servers": args.bootstrap}).list_topics(timeout=10)
    ends = {}
    assignment = []
    for topic in args.topics:
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > low:
                ends[(topic, partition)] = high
                assignment.append(TopicPartition(topic, partition, low))
    consumer.assign(assignment)

    summary = {"messages": 0, "decoded": 0, "failures": [], "events": []}
    positions = {tp: None for tp in ends}
    deadline = time.monotonic() + args.timeout
    while any(positions[tp] is None or positions[tp] + 1 < ends[tp] for tp in ends):
        if time.monotonic() > deadline:
            summary["failures"].append(f"timed out; read up to {positions}, ends {ends}")
            break
        try:
            message = consumer.poll(1.0)
        except ConsumeError as e:
            # A message that does not deserialize: recorded, and reading goes on past it.
            m = e.kafka_message
            summary["messages"] += 1
            where = "?"
            if m is not None:
                positions[(m.topic(), m.partition())] = m.offset()
                where = f"{m.topic()}/{m.partition()}@{m.offset()}"
            summary["failures"].append(f"{where}: {e}")
            continue
        if message is None:
            continue
        if message.error():
            summary["failures"].append(str(message.error()))
            continue
        summary["messages"] += 1
        positions[(message.topic(), message.partition())] = message.offset()
        value = message.value()
        problems = check(message, value)
        if problems:
            where = f"{message.topic()}/{message.partition()}@{message.offset()}"
            summary["failures"].extend(f"{where}: {p}" for p in problems)
            continue
        summary["decoded"] += 1
        summary["events"].append([message.topic(), message.key(), value["version"]])
    consumer.close()
    json.dump(summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
