// Java Avro's Parsing Canonical Form and CRC-64-AVRO fingerprint of schemas: the reference
// implementation as the oracle of dualsync's own (tests/it/interop.rs).
//
// stdin:  {"schemas": [<schema JSON text>, ...]}
// stdout: {"forms": [{"pcf": ..., "fingerprint": <hex, wire byte order>} | {"error": ...}, ...]}
//
// Run as a single source file: java -cp '<avro jars>/*' Fingerprints.java

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

public class Fingerprints {
    public static void main(String[] args) throws Exception {
        ObjectMapper json = new ObjectMapper();
        JsonNode request = json.readTree(System.in);
        ObjectNode out = json.createObjectNode();
        ArrayNode forms = out.putArray("forms");
        for (JsonNode text : request.get("schemas")) {
            ObjectNode form = forms.addObject();
            try {
                Schema schema = new Schema.Parser().parse(text.asText());
                form.put("pcf", SchemaNormalization.toParsingForm(schema));
                long fp = SchemaNormalization.parsingFingerprint64(schema);
                // Single-object encoding writes the fingerprint little-endian.
                form.put("fingerprint", String.format("%016x", Long.reverseBytes(fp)));
            } catch (Exception e) {
                form.put("error", e.toString());
            }
        }
        System.out.println(json.writeValueAsString(out));
    }
}
