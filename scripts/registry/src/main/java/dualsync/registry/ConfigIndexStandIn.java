package dualsync.registry;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.List;
import javax.enterprise.inject.Produces;
import javax.inject.Singleton;

/**
 * The bean the config-index extension would generate at build time (its deployment jar is not on
 * Maven Central). It lists the properties an admin may change at run time; none here.
 */
public class ConfigIndexStandIn {
    @Produces
    @Singleton
    DynamicConfigPropertyList dynamicConfigProperties() {
        return new DynamicConfigPropertyList(List.of());
    }
}
