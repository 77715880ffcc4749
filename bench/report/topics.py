#!/usr/bin/env python3
"""When each event reached its topic, for `make bench`'s side-by-side phases (confluent-kafka).

  bench/report/topics.py create BROKERS PARTITIONS REPLICATION TOPIC...
      creates the topics (3 partitions as dualsync's, unless told) with
      message.timestamp.type=LogAppendTime, so every record carries the broker's own time of
      appending it; both pipelines' topics are made this way and read back the same way. With a
      replication factor of 3 or more they get min.insync.replicas=2 (the production profile).
  bench/report/topics.py delete BROKERS TOPIC...
      deletes the topics (the production profile, once a phase's figures are taken).
  bench/report/topics.py dump BROKERS HEADER EXPECTED OUT.csv TOPIC...
      reads the topics from the beginning until EXPECTED distinct seqs carrying HEADER were seen
      (or 60 s without a new record; a relay failover publishes some events twice) and writes "seq,append_time_ms" lines, seq being the outbox row's
      seq taken from HEADER (dualsync: dualsync.version; the peer: seq, set by the EventRouter;
      dualsync capturing from the WAL: dualsync.event_id, the outbox row's id, as its version
      there is the WAL position).
"""
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


def settle(futures, tolerated_code):
    """Waits for an admin request's futures; the one error code given means already done."""
    for future in futures.values():
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() != tolerated_code:
                raise


def create(brokers, partitions, replication, topics):
    admin = AdminClient({"bootstrap.servers": brokers})
    config = {"message.timestamp.type": "LogAppendTime"}
    if replication >= 3:
        config["min.insync.replicas"] = "2"
    new = [NewTopic(t, num_partitions=partitions, replication_factor=replication, config=config)
           for t in topics]
    settle(admin.create_topics(new), 36)  # TOPIC_ALREADY_EXISTS


def delete(brokers, topics):
    admin = AdminClient({"bootstrap.servers": brokers})  # held: a dropped client fails its futures
    settle(admin.delete_topics(topics), 3)  # UNKNOWN_TOPIC_OR_PART


def dump(brokers, header, expected, out, topics):
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"bench-dump-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.max.bytes": 52428800})
    consumer.subscribe(topics)
    # Integer seqs are counted in a bytearray (a 1,000,000-event drain), event ids in a set.
    seen, last_new, distinct, ids = 0, time.monotonic(), bytearray(), set()
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
                if not seq.isdigit():
                    if seq not in ids:
                        ids.add(seq)
                        seen += 1
                    last_new = time.monotonic()
                    continue
                n = int(seq)
                if n >= len(distinct):
                    distinct.extend(bytes(n + 1 - len(distinct) + 1_000_000))
                if not distinct[n]:
                    distinct[n] = 1
                    seen += 1
                last_new = time.monotonic()
    consumer.close()
    print(seen)


def main():
    cmd, brokers = sys.argv[1], sys.argv[2]
    if cmd == "create":
        create(brokers, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    elif cmd == "delete":
        delete(brokers, sys.argv[3:])
    elif cmd == "dump":
        dump(brokers, sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
