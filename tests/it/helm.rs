//! The Helm chart (deploy/helm/dualsync): `helm lint`, `helm template` with the default values
//! and with ci/all-values.yaml (everything switched on), and every rendered Deployment started
//! the way its pods would start, up to the config: the ConfigMap's pipeline.toml written to a
//! file, the container's environment resolved (Secrets from [`secret`], the test's stand-in
//! for the cluster), and `dualsync config check` run on them with the container's `--sink`.
//!
//! The program comes from `scripts/test.sh` (`go install` into `~/.dualsync/tools`), named by
//! `DUALSYNC_TEST_HELM`. No Kubernetes cluster is involved.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_yaml::Value;

use crate::common::{config_check, run_tool, test_tool, unique};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/dualsync");
const ALL_VALUES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/helm/dualsync/ci/all-values.yaml"
);

fn helm(args: &[&str]) -> Result<String, String> {
    run_tool(&test_tool("DUALSYNC_TEST_HELM", "Helm"), args)
}

fn render(extra: &[&str]) -> String {
    let mut args = vec!["template", "t", CHART];
    args.extend_from_slice(extra);
    helm(&args).unwrap_or_else(|e| panic!("{e}"))
}

/// The Secrets the stand-in cluster holds: (name, key) -> value. A chart referring to any
/// other would leave its pods in CreateContainerConfigError.
fn secret(name: &str, key: &str) -> Option<&'static str> {
    Some(match (name, key) {
        ("dualsync-source", "url") => "postgres://relay:pw@primary:5432/shop",
        ("dualsync-sink-postgres", "url") => "postgres://apply:pw@replica:5432/shop",
        ("dualsync-sink-mongo", "url") => "mongodb://apply:pw@mongo:27017/?replicaSet=rs0",
        ("orders-primary", "url") => "postgresql://relay:pw@primary/orders?sslmode=require",
        ("orders-replica", "url") => "postgres://apply:pw@replica/orders",
        ("orders-search", "uri") => "mongodb+srv://apply:pw@search.example/?tls=true",
        ("orders-archive", "url") => "postgres://apply:pw@archive/orders",
        ("orders-kafka", "password") => "kafka-secret",
        ("orders-http", "token") => "http-secret",
        ("orders-registry", "password") => "registry-secret",
        _ => return None,
    })
}

fn manifests(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("helm printed YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|m| m["kind"] == kind).collect()
}

fn text(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| {
        serde_yaml::to_string(v)
            .unwrap_or_default()
            .trim()
            .to_string()
    })
}

/// Every Deployment of a rendering checked as its pod would start: one line per Deployment
/// (`name: <config check's summary>`), or the first problem.
fn check_rendered(yaml: &str) -> Result<Vec<String>, String> {
    let all = manifests(yaml);
    let config_maps: BTreeMap<String, &Value> = of_kind(&all, "ConfigMap")
        .into_iter()
        .map(|m| (text(&m["metadata"]["name"]), &m["data"]))
        .collect();
    let dir = std::env::temp_dir().join(unique("dualsync_helm"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = Vec::new();
    for deployment in of_kind(&all, "Deployment") {
        let name = text(&deployment["metadata"]["name"]);
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<String> = container["args"]
            .as_sequence()
            .ok_or(format!("{name}: no args"))?
            .iter()
            .map(text)
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let role = if args.iter().any(|a| a == "relay") {
            "relay"
        } else if args.iter().any(|a| a == "apply") {
            "apply"
        } else {
            return Err(format!("{name}: neither relay nor apply in {args:?}"));
        };
        // The pipeline file: the ConfigMap key behind the mount that holds --config.
        let config_path = after("--config").ok_or(format!("{name}: no --config"))?;
        let mount = container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|m| config_path.starts_with(&format!("{}/", text(&m["mountPath"]))))
            .ok_or(format!("{name}: nothing is mounted at {config_path}"))?;
        let key = &config_path[text(&mount["mountPath"]).len() + 1..];
        let volume = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .ok_or(format!("{name}: no volume {}", text(&mount["name"])))?;
        let map = text(&volume["configMap"]["name"]);
        let toml = config_maps
            .get(&map)
            .and_then(|data| data[key].as_str())
            .ok_or(format!("{name}: ConfigMap {map} has no {key}"))?;
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, toml).unwrap();
        // The environment the kubelet would give the container.
        let mut env = Vec::new();
        for var in container["env"].as_sequence().into_iter().flatten() {
            let var_name = text(&var["name"]);
            let value = if let Some(v) = var.get("value") {
                text(v)
            } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
                let (s, k) = (text(&r["name"]), text(&r["key"]));
                secret(&s, &k)
                    .ok_or(format!("{name}: ${var_name} refers to Secret {s} key {k}, which the cluster does not hold"))?
                    .to_string()
            } else {
                return Err(format!(
                    "{name}: ${var_name} has neither a value nor a Secret"
                ));
            };
            env.push((var_name, value));
        }
        let summary = config_check(&file, after("--sink").as_deref(), &env)
            .map_err(|e| format!("{name}: dualsync config check refused its config: {e}"))?;
        // The probes and the Service go to the port the process listens on, on an address
        // the kubelet reaches.
        let port = container["ports"][0]["containerPort"]
            .as_u64()
            .ok_or(format!("{name}: no containerPort"))?;
        let http = summary.rsplit("http ").next().unwrap_or_default();
        let (host, ports) = http.rsplit_once(':').unwrap_or_default();
        let (relay_port, apply_port) = ports.split_once('/').unwrap_or_default();
        let listens = if role == "relay" {
            relay_port
        } else {
            apply_port
        };
        if listens != port.to_string() || host == "127.0.0.1" {
            return Err(format!(
                "{name}: the process listens on {http} ({role}), the pod's port is {port}"
            ));
        }
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            if get["path"] != path || get["port"] != "http" {
                return Err(format!(
                    "{name}: {probe} is not GET {path} on the http port"
                ));
            }
        }
        lines.push(format!("{name}: {summary}"));
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(lines)
}

fn names(all: &[Value], kind: &str) -> Vec<String> {
    of_kind(all, kind)
        .iter()
        .map(|m| text(&m["metadata"]["name"]))
        .collect()
}

#[test]
fn helm_lint_passes_with_the_default_values_and_with_everything_enabled() {
    helm(&["lint", "--strict", CHART]).unwrap();
    helm(&["lint", "--strict", CHART, "-f", ALL_VALUES]).unwrap();
}

#[test]
fn helm_chart_default_values_render_a_config_dualsync_accepts() {
    let yaml = render(&[]);
    let lines = check_rendered(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let all = manifests(&yaml);
    let mut deployments = names(&all, "Deployment");
    deployments.sort();
    assert_eq!(
        deployments,
        [
            "t-dualsync-apply-mongo",
            "t-dualsync-apply-postgres",
            "t-dualsync-relay"
        ]
    );
    let relay = of_kind(&all, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "t-dualsync-relay")
        .unwrap();
    assert_eq!(relay["spec"]["replicas"], 2, "leader and standby");
    // Requests are set (sized from BENCHMARKS.md, see values.yaml).
    let requests = &relay["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"];
    assert!(requests.get("cpu").is_some() && requests.get("memory").is_some());
    // Optional parts are off by default.
    assert!(names(&all, "ServiceMonitor").is_empty());
    assert!(names(&all, "PrometheusRule").is_empty());
    // No secret value is in what the chart renders: only references to Secrets.
    assert!(!yaml.contains("pw@"), "{yaml}");
}

#[test]
fn helm_chart_with_everything_enabled_renders_a_valid_config_and_the_alert_rules() {
    let yaml = render(&["-f", ALL_VALUES]);
    let lines = check_rendered(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lines.len(), 4, "relay and three sinks: {lines:#?}");
    assert!(
        lines.iter().all(|l| l.contains("pipeline orders")
            && l.contains("schema registry yes")
            && l.contains("archive-db (postgres), replica (postgres), search (mongodb)")),
        "{lines:#?}"
    );
    let all = manifests(&yaml);
    // The PrometheusRule carries deploy/prometheus/dualsync-alerts.yml's groups unchanged.
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/prometheus/dualsync-alerts.yml"
        ))
        .unwrap(),
    )
    .unwrap();
    let rule = of_kind(&all, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    assert_eq!(rule[0]["spec"]["groups"], rules["groups"]);
    assert_eq!(rule[0]["metadata"]["labels"]["release"], "prometheus");
    // The ServiceMonitor scrapes /metrics of every Service, with the job names the alert
    // rules expect (dualsync-*).
    let monitor = of_kind(&all, "ServiceMonitor");
    assert_eq!(monitor.len(), 1);
    let endpoint = &monitor[0]["spec"]["endpoints"][0];
    assert_eq!(
        (&endpoint["port"], &endpoint["path"]),
        (&"http".into(), &"/metrics".into())
    );
    let job_label = text(&monitor[0]["spec"]["jobLabel"]);
    let services = of_kind(&all, "Service");
    assert_eq!(services.len(), 4);
    for service in services {
        let job = text(&service["metadata"]["labels"][job_label.as_str()]);
        assert!(job.starts_with("dualsync-"), "{job}");
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    }
}

/// Renders with a values file holding `values`.
fn render_with(values: &str) -> String {
    let file: PathBuf = std::env::temp_dir().join(format!("{}.yaml", unique("dualsync_values")));
    std::fs::write(&file, values).unwrap();
    let yaml = render(&["-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).ok();
    yaml
}

/// The check itself fails when the chart renders what dualsync would refuse: a sink the
/// pipeline file does not have, a key it does not know, a Secret the cluster lacks.
#[test]
fn helm_rendering_a_config_dualsync_refuses_fails_the_check() {
    let e = check_rendered(&render_with(
        "sinks:\n  - {name: postgress, replicas: 1, urlSecret: {name: dualsync-sink-postgres, key: url}}\n  - {name: mongo, replicas: 1, urlSecret: {name: dualsync-sink-mongo, key: url}}\n",
    ))
    .unwrap_err();
    // Either sink is named: `postgres` lacks its url, `postgress` its kind.
    assert!(
        e.contains("refused its config") && e.contains(": sinks.postgres"),
        "{e}"
    );
    let e = check_rendered(&render_with(
        "config: |\n  [pipeline]\n  name = \"p\"\n  [source]\n  kind = \"postgres_outbox\"\n  [kafka]\n  brokerz = \"k:9092\"\nsinks: []\n",
    ))
    .unwrap_err();
    assert!(e.contains("kafka.brokerz: unknown field"), "{e}");
    let e = check_rendered(&render(&["--set", "secrets.source.name=elsewhere"])).unwrap_err();
    assert!(e.contains("Secret elsewhere key url"), "{e}");
    // Names Kubernetes cannot take stop the rendering itself.
    let e = helm(&["template", "t", CHART, "--set", "sinks[0].name=Pg_Replica"]).unwrap_err();
    assert!(e.contains("a sink name must be lower-case"), "{e}");
}
