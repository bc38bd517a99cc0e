"""Stream I/O: where records come from and where outputs go.

* :mod:`~streamtta.stream.base` -- the ``Source`` / ``Sink`` / ``DeadLetter`` protocols the engine uses;
* :mod:`~streamtta.stream.envelope` -- wire formats (binary tensor envelope, JSON rows) and validation;
* :mod:`~streamtta.stream.kafka` -- confluent-kafka source (at-least-once), JSON sink, dead-letter queue,
  producer and topic helpers;
* :mod:`~streamtta.stream.memory` -- in-memory source/sinks for offline replay and a fsync'ing JSONL sink;
* :mod:`~streamtta.stream.producer` -- replay samples into a topic;
* :mod:`~streamtta.stream.broker` -- embedded Kafka-protocol broker (Tansu, memory storage) for demos/tests.

Submodules are imported explicitly (``from streamtta.stream.kafka import KafkaSource``) so that offline
use never loads librdkafka.
"""
