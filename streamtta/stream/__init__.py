"""Stream I/O: where records come from and where outputs go.

* :mod:`~streamtta.stream.base` -- the ``Source`` / ``Sink`` / ``DeadLetter`` protocols the engine uses;
* :mod:`~streamtta.stream.envelope` -- wire formats and validation: a package with the binary tensor
  envelope (``tensor``), JSON rows (``rows``), their shared fields (``fields``) and the decode limits
  (``limits``), all re-exported by ``streamtta.stream.envelope``;
* :mod:`~streamtta.stream.kafka` -- confluent-kafka, a package with the client settings (``settings``), the
  at-least-once source (``source``), the JSON sink and dead-letter queue (``sinks``), topic creation
  (``admin``) and errors (``errors``), all re-exported by ``streamtta.stream.kafka``;
* :mod:`~streamtta.stream.memory` -- in-memory source/sinks for offline replay and a fsync'ing JSONL sink;
* :mod:`~streamtta.stream.producer` -- replay samples into a topic;
* :mod:`~streamtta.stream.broker` -- embedded Kafka-protocol broker (Tansu, memory storage) for demos/tests.

Submodules are imported explicitly (``from streamtta.stream.kafka import KafkaSource``) so that offline
use never loads librdkafka.
"""
