#!/usr/bin/env python3
"""When each event reached its topic, for `make bench`'s side-by-side phases (confluent-kafka).

  bench_topics.py create BROKERS TOPIC...
      creates the topics (3 partitions, as dualsync's) with message.timestamp.type=LogAppendTime,
      so every record carries the broker's own time of appending it; both pipelines' topics are
      made this way and read back the same way.
  bench_topics.py dump BROKERS HEADER EXPECTED OUT.csv TOPIC...
      reads the topics from the beginning until EXPECTED records carrying HEADER were seen (or
      60 s without a new record) and writes "seq,append_time_ms" lines, seq being the outbox row's
      seq taken from HEADER (dualsync: dualsync.version; the peer: seq, set by the EventRouter).
"""
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


def create(brokers, topics):
    admin = AdminClient({"bootstrap.servers": brokers})
    new = [NewTopic(t, num_partitions=3, replication_factor=1,
                    config={"message.timestamp.type": "LogAppendTime"}) for t in topics]
    for topic, future in admin.create_topics(new).items():
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS
                raise


def dump(brokers, header, expected, out, topics):
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"bench-dump-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.max.bytes": 52428800})
    consumer.subscribe(topics)
    seen, last_new = 0, time.monotonic()
    key = header.encode() if isinstance(header, str) else header
    with open(out, "w") as f:
        while seen < expected and time.monotonic() - last_new < 60:
            for msg in consumer.consume(10000, timeout=1.0):
                if msg.error():
                    continue
                seq = next((v for k, v in (msg.headers() or []) if k.encode() == key), None)
                if seq is None:
                    continue
                f.write(f"{seq.decode()},{msg.timestamp()[1]}\n")
                seen += 1
                last_new = time.monotonic()
    consumer.close()
    print(seen)


def main():
    cmd, brokers = sys.argv[1], sys.argv[2]
    if cmd == "create":
        create(brokers, sys.argv[3:])
    elif cmd == "dump":
        dump(brokers, sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
