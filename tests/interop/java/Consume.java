// A consumer of dualsync's topics written the way another team would, in Java: Apache Kafka's
// kafka-clients and Apache Avro from Maven Central, nothing from dualsync but the schema files
// (single-object framing) or the registry's address (Confluent framing). Confluent's own
// KafkaAvroDeserializer is not on Maven Central, so a Confluent frame's schema id is resolved
// with the registry's REST API (GET /schemas/ids/<id>) and decoded with Avro's
// GenericDatumReader: the same two steps that deserializer takes.
//
// Reads each partition of the topics from its start to the end it had at start and checks
// every message: it decodes, its key equals the envelope's aggregate_id, every dualsync.*
// header equals the envelope field of that name, and op is DELETE exactly when there is no
// payload. Prints a JSON summary on stdout:
//   {"messages": N, "decoded": N, "failures": [...], "events": [[topic, key, version], ...]}
//
// Run as a single source file (scripts/interop.sh java prints the classpath):
//   java -cp '<jars>/*' Consume.java --bootstrap HOST:PORT [--schemas DIR] [--registry URL] TOPIC...
//
// docs/consumers.md shows the regions between "docs:begin" and "docs:end" as they are;
// tests/it/interop_java.rs runs this file and checks that the page still shows them.

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringDeserializer;

public class Consume {
    static final ObjectMapper JSON = new ObjectMapper();
    static final Map<Long, Schema> singleObject = new HashMap<>();
    static final Map<Integer, Schema> byId = new HashMap<>();
    static String registryUrl;

    // docs:begin writer-schemas
    /** The envelope around one aggregate's schema, as docs/consumers.md describes it. */
    static Schema envelopeFor(JsonNode payload, JsonNode template) {
        ObjectNode envelope = template.deepCopy();
        String name = payload.get("name").asText();
        String namespace = payload.has("namespace") ? payload.get("namespace").asText() : null;
        if (name.contains(".")) {
            namespace = name.substring(0, name.lastIndexOf('.'));
            name = name.substring(name.lastIndexOf('.') + 1);
        }
        envelope.put("name", name + "Event");
        if (namespace != null) {
            envelope.put("namespace", namespace);
        }
        for (JsonNode field : envelope.get("fields")) {
            if (field.get("name").asText().equals("payload")) {
                ((ObjectNode) field).set("type", JSON.createArrayNode().add("null").add(payload));
            }
        }
        return new Schema.Parser().parse(envelope.toString());
    }

    /** Every schema dualsync can write, by the fingerprint single-object encoding carries. */
    static Map<Long, Schema> writerSchemas(Path dir) throws IOException {
        JsonNode template = JSON.readTree(dir.resolve("envelope/envelope.avsc").toFile());
        List<Schema> schemas = new ArrayList<>();
        try (DirectoryStream<Path> files = Files.newDirectoryStream(dir, "*.avsc")) {
            for (Path file : files) {
                schemas.add(envelopeFor(JSON.readTree(file.toFile()), template));
            }
        }
        schemas.add(new Schema.Parser().parse(dir.resolve("envelope/mongo-change.avsc").toFile()));
        Map<Long, Schema> out = new HashMap<>();
        for (Schema schema : schemas) {
            out.put(SchemaNormalization.parsingFingerprint64(schema), schema);
        }
        return out;
    }
    // docs:end

    // docs:begin registry
    static final HttpClient HTTP = HttpClient.newHttpClient();

    /** The writer schema of a Confluent schema id, from the registry (each id asked once). */
    static Schema registrySchema(int id) throws IOException, InterruptedException {
        Schema known = byId.get(id);
        if (known != null) {
            return known;
        }
        HttpRequest request = HttpRequest.newBuilder(URI.create(registryUrl + "/schemas/ids/" + id))
                .header("Accept", "application/vnd.schemaregistry.v1+json")
                .build();
        HttpResponse<String> response = HTTP.send(request, HttpResponse.BodyHandlers.ofString());
        if (response.statusCode() != 200) {
            throw new IOException("schema id " + id + ": HTTP " + response.statusCode() + " " + response.body());
        }
        Schema schema = new Schema.Parser().parse(JSON.readTree(response.body()).get("schema").asText());
        byId.put(id, schema);
        return schema;
    }
    // docs:end

    // docs:begin decode
    /** One message value, in either framing, decoded with its writer schema. */
    static GenericRecord decode(byte[] value) throws Exception {
        Schema writer;
        int start;
        if (value.length >= 10 && value[0] == (byte) 0xC3 && value[1] == (byte) 0x01) {
            // Single-object encoding: C3 01, the fingerprint (little-endian), the datum.
            long fingerprint = ByteBuffer.wrap(value, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
            writer = singleObject.get(fingerprint);
            if (writer == null) {
                throw new IllegalArgumentException(String.format("unknown fingerprint %016x", fingerprint));
            }
            start = 10;
        } else if (value.length >= 5 && value[0] == 0 && registryUrl != null) {
            // Confluent wire format: 00, the schema id (big-endian), the datum.
            writer = registrySchema(ByteBuffer.wrap(value, 1, 4).getInt());
            start = 5;
        } else {
            throw new IllegalArgumentException("neither single-object encoded nor a Confluent frame");
        }
        BinaryDecoder decoder = DecoderFactory.get().binaryDecoder(value, start, value.length - start, null);
        GenericRecord event = new GenericDatumReader<GenericRecord>(writer).read(null, decoder);
        if (!decoder.isEnd()) {
            throw new IllegalArgumentException("bytes left over after the datum");
        }
        return event;
    }
    // docs:end

    // docs:begin check
    /** The envelope fields every dualsync message also carries as a header. */
    static final List<String> CORE_HEADERS =
            List.of("event_id", "event_type", "aggregate_type", "aggregate_id", "version", "created_at");
    /** Headers with no envelope field: when the primary committed the change (µs, decimal). */
    static final Set<String> HEADER_ONLY = Set.of("committed_at");

    /** What is wrong with one decoded message (empty when nothing is). */
    static List<String> check(ConsumerRecord<String, byte[]> record, GenericRecord event) {
        List<String> problems = new ArrayList<>();
        String aggregateId = event.get("aggregate_id").toString();
        if (!aggregateId.equals(record.key())) {
            problems.add("key " + record.key() + " != aggregate_id " + aggregateId);
        }
        Set<String> seen = new HashSet<>();
        for (Header header : record.headers()) {
            if (!header.key().startsWith("dualsync.")) {
                continue;
            }
            String field = header.key().substring("dualsync.".length());
            String text = new String(header.value(), StandardCharsets.UTF_8);
            seen.add(field);
            if (HEADER_ONLY.contains(field)) {
                if (!text.matches("[0-9]+")) {
                    problems.add("header " + header.key() + "=" + text + " is not a time in µs");
                }
                continue;
            }
            // Avro's generic reader gives created_at (timestamp-micros) as the long it is.
            Object value = event.getSchema().getField(field) == null ? null : event.get(field);
            if (value == null || !value.toString().equals(text)) {
                problems.add("header " + header.key() + "=" + text + " != envelope " + value);
            }
        }
        for (String field : CORE_HEADERS) {
            if (!seen.contains(field)) {
                problems.add("header dualsync." + field + " is missing");
            }
        }
        boolean delete = event.get("op").toString().equals("DELETE");
        if (delete != (event.get("payload") == null)) {
            problems.add("op " + event.get("op") + " with payload " + event.get("payload"));
        }
        return problems;
    }
    // docs:end

    public static void main(String[] args) throws Exception {
        String bootstrap = null;
        List<String> topics = new ArrayList<>();
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--bootstrap" -> bootstrap = args[++i];
                case "--schemas" -> singleObject.putAll(writerSchemas(Path.of(args[++i])));
                case "--registry" -> registryUrl = args[++i].replaceAll("/+$", "");
                default -> topics.add(args[i]);
            }
        }
        if (bootstrap == null || topics.isEmpty()) {
            System.err.println("usage: Consume.java --bootstrap HOST:PORT [--schemas DIR] [--registry URL] TOPIC...");
            System.exit(2);
        }
        ObjectNode summary = JSON.createObjectNode();
        ArrayNode failures = summary.putArray("failures");
        ArrayNode events = summary.putArray("events");
        int messages = 0;
        int decoded = 0;

        // docs:begin read
        Properties config = new Properties();
        config.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        config.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        try (KafkaConsumer<String, byte[]> consumer =
                new KafkaConsumer<>(config, new StringDeserializer(), new ByteArrayDeserializer())) {
            // Every partition from its start to the end it has now.
            List<TopicPartition> partitions = new ArrayList<>();
            for (String topic : topics) {
                var found = consumer.partitionsFor(topic);
                if (found.isEmpty()) {
                    failures.add(topic + ": no such topic");
                }
                found.forEach(p -> partitions.add(new TopicPartition(topic, p.partition())));
            }
            consumer.assign(partitions);
            consumer.seekToBeginning(partitions);
            Map<TopicPartition, Long> ends = new HashMap<>(consumer.endOffsets(partitions));
            long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
            while (!ends.isEmpty() && System.nanoTime() < deadline) {
                for (ConsumerRecord<String, byte[]> record : consumer.poll(Duration.ofMillis(200))) {
                    TopicPartition tp = new TopicPartition(record.topic(), record.partition());
                    if (record.offset() >= ends.getOrDefault(tp, 0L)) {
                        continue;
                    }
                    messages++;
                    String where = record.topic() + "[" + record.partition() + "]@" + record.offset();
                    try {
                        GenericRecord event = decode(record.value());
                        decoded++;
                        events.addArray().add(record.topic()).add(record.key()).add((Long) event.get("version"));
                        for (String problem : check(record, event)) {
                            failures.add(where + ": " + problem);
                        }
                    } catch (Exception e) {
                        failures.add(where + ": " + e);
                    }
                }
                ends.keySet().removeIf(tp -> consumer.position(tp) >= ends.get(tp));
            }
            for (TopicPartition tp : ends.keySet()) {
                failures.add(tp + ": not read to its end within 60 s");
            }
        }
        // docs:end
        summary.put("messages", messages);
        summary.put("decoded", decoded);
        System.out.println(JSON.writeValueAsString(summary));
    }
}
