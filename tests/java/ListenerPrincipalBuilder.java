// A broker-side principal builder for tests/it/topic_refusals.rs: whoever connects to the
// listener named CLIENT is User:app, everyone else (the inter-broker and controller
// listeners, the test's admin) is User:admin. Lets a test give the application user ACLs
// without setting up SASL.

import org.apache.kafka.common.security.auth.AuthenticationContext;
import org.apache.kafka.common.security.auth.KafkaPrincipal;
import org.apache.kafka.common.security.authenticator.DefaultKafkaPrincipalBuilder;

public class ListenerPrincipalBuilder extends DefaultKafkaPrincipalBuilder {
    public ListenerPrincipalBuilder() {
        super(null, null);
    }

    @Override
    public KafkaPrincipal build(AuthenticationContext context) {
        String user = "CLIENT".equals(context.listenerName()) ? "app" : "admin";
        return new KafkaPrincipal(KafkaPrincipal.USER_TYPE, user);
    }
}
