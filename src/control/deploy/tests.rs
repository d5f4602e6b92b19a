//! Unit tests of the deploy state machine: the container spec, and
//! deploy, rollback, reconciliation and retirement against an in-memory
//! [`ContainerRuntime`] on tokio's paused clock.

use super::*;

#[test]
fn env_file_lines() {
    let text = "# secrets\nDB_PASSWORD=s3cret\n\n  TZ=Asia/Seoul  \nnot a pair\n";
    assert_eq!(
        parse_env_file(text),
        vec!["DB_PASSWORD=s3cret", "TZ=Asia/Seoul"]
    );
}

#[test]
fn tag_uses_the_configured_repository() {
    let settings = ContainerSettings {
        image: "registry.example/team/web".into(),
        port: 8080,
        host_ports: Some([8080, 8081]),
        env: Default::default(),
        env_file: None,
        volumes: vec![],
        extra_hosts: vec![],
        stop_timeout: Duration::from_secs(1),
        keep_previous: Duration::from_secs(1),
        retain: 1,
        docker_config: None,
    };
    assert_eq!(
        ImageChoice::Tag("abc123".into()).resolve(&settings),
        "registry.example/team/web:abc123"
    );
    let spec = container_spec("web", "green", "img:1", "d1", "prod", &settings).expect("spec");
    assert_eq!(spec.host_port, Some(8081));
    assert_eq!(spec.instance, "prod");
    assert_eq!(spec.name, "cutover-web-green-d1");
}

// ---------------------------------------------------------------------
// The state machine against a fake engine, on tokio's paused clock.
// ---------------------------------------------------------------------

mod state_machine {
    use std::collections::{BTreeMap, VecDeque};
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::future::BoxFuture;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    use crate::config::Config;
    use crate::control::report::RollbackReport;
    use crate::control::state::{BakePhase, BakeState, StateStore};
    use crate::control::{ControlError, Controller, ImageChoice, Progress};
    use crate::docker::{ContainerInfo, ContainerRuntime, ContainerSpec, DockerError};
    use crate::metrics::Operation;
    use crate::routing::{Shared, Snapshot};

    /// An engine in memory: containers are entries in a map, each
    /// "listening" on an address the test hands out (a small HTTP server
    /// that answers health probes as the test decides).
    #[derive(Default)]
    struct FakeEngine {
        state: Mutex<FakeState>,
        /// Signalled when a held create has reached the engine.
        created: Notify,
    }

    #[derive(Default)]
    struct FakeState {
        containers: BTreeMap<String, ContainerInfo>,
        created: u32,
        /// The host address each next container publishes, in order.
        addrs: VecDeque<SocketAddr>,
        /// Every change made to a container, in order: "create NAME",
        /// "stop ID", "remove ID", "start ID".
        changes: Vec<String>,
        /// A create that never answers, as if cutover died during it.
        hold_creates: bool,
    }

    impl FakeEngine {
        fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// The next container created publishes `addr`.
        fn publish_next(&self, addr: SocketAddr) {
            self.lock().addrs.push_back(addr);
        }

        fn container(&self, id: &str) -> Option<ContainerInfo> {
            self.lock().containers.get(id).cloned()
        }

        fn by_color(&self, color: &str) -> Vec<ContainerInfo> {
            let state = self.lock();
            let found = state.containers.values();
            found
                .filter(|c| c.color.as_deref() == Some(color))
                .cloned()
                .collect()
        }

        /// The changes made to the container `id` so far.
        fn changes_to(&self, id: &str) -> Vec<String> {
            self.lock()
                .changes
                .iter()
                .filter(|change| change.ends_with(id))
                .cloned()
                .collect()
        }

        fn not_found(id: &str) -> DockerError {
            DockerError::NotFound(format!("No such container: {id}"))
        }
    }

    impl ContainerRuntime for FakeEngine {
        fn ping(&self) -> BoxFuture<'_, Result<(), DockerError>> {
            Box::pin(async { Ok(()) })
        }
        fn image_exists<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<bool, DockerError>> {
            Box::pin(async { Ok(true) })
        }
        fn pull<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a Path>,
            _: &'a mut (dyn FnMut(String) + Send),
        ) -> BoxFuture<'a, Result<(), DockerError>> {
            Box::pin(async { Ok(()) })
        }
        fn create_and_start<'a>(
            &'a self,
            spec: &'a ContainerSpec,
        ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>> {
            Box::pin(async move {
                let (info, hold) = {
                    let mut state = self.lock();
                    state.created += 1;
                    let n = state.created;
                    let info = ContainerInfo {
                        id: format!("{n:02}{}", "c".repeat(62)),
                        name: spec.name.clone(),
                        image: spec.image.clone(),
                        service: Some(spec.service.clone()),
                        color: Some(spec.color.clone()),
                        deploy_id: Some(spec.deploy_id.clone()),
                        instance: Some(spec.instance.clone()),
                        running: true,
                        exit_code: None,
                        host_addr: state.addrs.pop_front(),
                        started_at: Some(format!("2026-01-01T00:00:{n:02}Z")),
                    };
                    state.changes.push(format!("create {}", info.id));
                    state.containers.insert(info.id.clone(), info.clone());
                    (info, state.hold_creates)
                };
                if hold {
                    self.created.notify_one();
                    std::future::pending::<()>().await;
                }
                Ok(info)
            })
        }
        fn start<'a>(
            &'a self,
            id: &'a str,
            _: u16,
        ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>> {
            Box::pin(async move {
                let mut state = self.lock();
                state.changes.push(format!("start {id}"));
                let info = state
                    .containers
                    .get_mut(id)
                    .ok_or_else(|| Self::not_found(id))?;
                info.running = true;
                Ok(info.clone())
            })
        }
        fn inspect<'a>(
            &'a self,
            id: &'a str,
            _: u16,
        ) -> BoxFuture<'a, Result<ContainerInfo, DockerError>> {
            Box::pin(async move {
                let state = self.lock();
                let by_name = state.containers.values().find(|c| c.name == id);
                let found = state.containers.get(id).or(by_name);
                found.cloned().ok_or_else(|| Self::not_found(id))
            })
        }
        fn stop_and_remove<'a>(
            &'a self,
            id: &'a str,
            _: Duration,
        ) -> BoxFuture<'a, Result<(), DockerError>> {
            Box::pin(async move {
                let mut state = self.lock();
                state.changes.push(format!("stop {id}"));
                state.containers.remove(id);
                Ok(())
            })
        }
        fn remove_force<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), DockerError>> {
            Box::pin(async move {
                let mut state = self.lock();
                state.changes.push(format!("remove {id}"));
                state.containers.remove(id);
                Ok(())
            })
        }
        fn logs_tail<'a>(
            &'a self,
            _: &'a str,
            _: usize,
        ) -> BoxFuture<'a, Result<Vec<String>, DockerError>> {
            Box::pin(async { Ok(vec!["listening on 8080".to_string()]) })
        }
        fn list_service<'a>(
            &'a self,
            service: &'a str,
            _: u16,
        ) -> BoxFuture<'a, Result<Vec<ContainerInfo>, DockerError>> {
            Box::pin(async move {
                let state = self.lock();
                let listed = state.containers.values();
                Ok(listed
                    .filter(|c| c.service.as_deref() == Some(service))
                    .cloned()
                    .collect())
            })
        }
        fn remove_image<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), DockerError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// An HTTP server on 127.0.0.1 that answers every request with
    /// `status`: a container's app, healthy (200) or not (500).
    async fn app(status: u16) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    /// A service `web` run as containers, with its state in `dir`;
    /// `extra` adds lines to the service's table.
    fn config(dir: &Path, extra: &str) -> Arc<Config> {
        let text = format!(
            "[server]\nstate_dir = \"{}\"\n\
             [service.web]\nimage = \"web\"\nport = 8080\nstop_timeout = \"1s\"\n\
             keep_previous = \"30s\"\ndrain_timeout = \"5s\"\n\
             health = {{ path = \"/health\", interval = \"1s\", timeout = \"1s\", deadline = \"5s\" }}\n{extra}",
            dir.display()
        );
        Arc::new(Config::parse(&text, "proxy.toml", dir).expect("config"))
    }

    /// A controller (as the server builds it) whose deployer uses `engine`;
    /// a second one on the same directory is a restart.
    fn controller(dir: &Path, engine: &Arc<FakeEngine>) -> Arc<Controller> {
        controller_with(dir, engine, "")
    }

    /// [`controller`] with `extra` lines in the service's table.
    fn controller_with(dir: &Path, engine: &Arc<FakeEngine>, extra: &str) -> Arc<Controller> {
        let config = config(dir, extra);
        let shared = Arc::new(Shared {
            snapshot: arc_swap::ArcSwap::from_pointee(Snapshot::build(config, None)),
            https_port: crate::routing::RedirectPort::new(None),
            shutdown: CancellationToken::new(),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            tasks: tokio_util::task::TaskTracker::new(),
            acme: crate::tls::acme::AcmeCerts::new(),
            workers: crate::routing::WorkerLoad::new(0),
            access_log: crate::access_log::Sink::new(),
            metrics: crate::metrics::Metrics::new(true),
        });
        let engine = Arc::clone(engine);
        let connect: super::Connect = Box::new(move || {
            let engine = Arc::clone(&engine) as Arc<dyn ContainerRuntime>;
            Box::pin(async move { Ok(engine) })
        });
        Controller::with_engine(
            shared,
            Some(StateStore::new(dir)),
            None,
            None,
            connect,
            "test".into(),
        )
    }

    /// A second controller on the same state directory and engine: cutover
    /// started again.
    fn controller_for_restart(dir: &Path, engine: &Arc<FakeEngine>) -> Arc<Controller> {
        controller(dir, engine)
    }

    async fn deploy(controller: &Controller, image: &str) -> Result<String, ControlError> {
        let choice = ImageChoice::Image(image.into());
        let progress = Progress::log_only();
        let report = controller
            .deploy(
                "web",
                choice,
                None,
                None,
                &progress,
                &CancellationToken::new(),
            )
            .await?;
        Ok(report.container)
    }

    /// The active upstream's container id and address.
    fn serving(controller: &Controller) -> (String, SocketAddr) {
        let active = controller.active("web").expect("an active upstream");
        let container = active.container.as_ref().expect("a container");
        (container.id.clone(), active.addr)
    }

    /// Blue serving `web:v1` on a healthy app.
    async fn blue_serving(
        engine: &Arc<FakeEngine>,
        dir: &Path,
    ) -> (Arc<Controller>, String, SocketAddr) {
        blue_serving_with(engine, dir, "").await
    }

    /// [`blue_serving`] with `extra` lines in the service's table.
    async fn blue_serving_with(
        engine: &Arc<FakeEngine>,
        dir: &Path,
        extra: &str,
    ) -> (Arc<Controller>, String, SocketAddr) {
        let controller = controller_with(dir, engine, extra);
        let addr = app(200).await;
        engine.publish_next(addr);
        let blue = deploy(&controller, "web:v1").await.expect("first deploy");
        assert_eq!(serving(&controller), (blue.clone(), addr));
        (controller, blue, addr)
    }

    /// Polls `done` on tokio's (paused) clock for at most ten seconds of it.
    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..1_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_deploy_switches_and_keeps_the_old_colour_warm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, _) = blue_serving(&engine, dir.path()).await;

        let green_addr = app(200).await;
        engine.publish_next(green_addr);
        let green = deploy(&controller, "web:v2").await.expect("second deploy");

        assert_eq!(serving(&controller), (green.clone(), green_addr));
        let warm = engine.container(&blue).expect("blue still exists");
        assert!(warm.running, "blue is kept running");
        assert!(engine.changes_to(&blue).len() == 1, "blue was only created");
        let record = controller.deployer.record("web");
        let previous = record.previous.expect("blue is the previous colour");
        assert_eq!(previous.color, "blue");
        assert_eq!(previous.container.map(|c| c.id), Some(blue.clone()));
        assert_eq!(record.history, vec!["web:v2", "web:v1"]);
        // The state file says the same.
        let saved = StateStore::new(dir.path()).load().expect("state file");
        let web = &saved.services["web"];
        assert_eq!(web.container.as_ref().map(|c| &c.id), Some(&green));
        let warm = web.previous.as_ref().and_then(|p| p.container.as_ref());
        assert_eq!(warm.map(|c| &c.id), Some(&blue));
        assert!(saved.starting.is_empty(), "{:?}", saved.starting);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_health_check_leaves_the_old_colour_and_removes_the_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, blue_addr) = blue_serving(&engine, dir.path()).await;

        engine.publish_next(app(500).await);
        let started = tokio::time::Instant::now();
        let err = deploy(&controller, "web:v2")
            .await
            .expect_err("an unhealthy container is not switched to");

        assert!(
            matches!(&err, ControlError::DeployFailed { reason, .. } if reason.contains("status 500")),
            "{err}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "gave up at the health deadline, not {waited:?}"
        );
        assert_eq!(serving(&controller), (blue.clone(), blue_addr));
        assert_eq!(engine.changes_to(&blue), vec![format!("create {blue}")]);
        assert!(
            engine.by_color("green").is_empty(),
            "the new one is removed"
        );
        let record = controller.deployer.record("web");
        let last = record.last_deploy.expect("the failure is recorded");
        assert!(!last.ok && last.image == "web:v2", "{last:?}");
        assert_eq!(record.starting, None);
        let saved = StateStore::new(dir.path()).load().expect("state file");
        let web = &saved.services["web"];
        assert_eq!(web.container.as_ref().map(|c| &c.id), Some(&blue));
        assert!(saved.starting.is_empty(), "{:?}", saved.starting);
    }

    /// cutover dies while the engine creates the new container; the state
    /// file says a deploy was starting it. The restart's reconciliation
    /// removes it and leaves the serving colour as it was.
    #[tokio::test(start_paused = true)]
    async fn a_restart_after_a_crash_mid_deploy_keeps_the_serving_colour() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, blue_addr) = blue_serving(&engine, dir.path()).await;

        engine.lock().hold_creates = true;
        engine.publish_next(app(200).await);
        tokio::select! {
            result = deploy(&controller, "web:v2") => panic!("the create never answers: {result:?}"),
            () = engine.created.notified() => {}
        }
        // The deploy future is dropped here: the crash.
        drop(controller);
        let saved = StateStore::new(dir.path()).load().expect("state file");
        let starting = saved
            .starting
            .get("web")
            .cloned()
            .expect("a deploy was starting");
        let green = engine.by_color("green");
        assert_eq!(green.len(), 1);
        assert_eq!(green[0].name, starting);
        engine.lock().hold_creates = false;

        let restarted = controller_for_restart(dir.path(), &engine);
        restarted.restore().await.expect("restore");
        restarted.reconcile().await;

        assert_eq!(serving(&restarted), (blue.clone(), blue_addr));
        assert_eq!(engine.changes_to(&blue), vec![format!("create {blue}")]);
        assert!(
            engine.by_color("green").is_empty(),
            "the half-made one is removed"
        );
        assert_eq!(
            engine.changes_to(&green[0].id),
            vec![
                format!("create {}", green[0].id),
                format!("remove {}", green[0].id)
            ]
        );
        let saved = StateStore::new(dir.path()).load().expect("state file");
        assert!(saved.starting.is_empty(), "{:?}", saved.starting);
        assert_eq!(
            saved.services["web"].container.as_ref().map(|c| &c.id),
            Some(&blue)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rollback_swaps_back_to_the_warm_colour() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, blue_addr) = blue_serving(&engine, dir.path()).await;
        engine.publish_next(app(200).await);
        let green = deploy(&controller, "web:v2").await.expect("second deploy");

        let progress = Progress::log_only();
        let report = controller
            .rollback("web", None, &progress, &CancellationToken::new())
            .await
            .expect("rollback");

        let RollbackReport::Instant(swap) = report else {
            panic!("the warm colour runs, so the rollback is instant: {report:?}");
        };
        assert_eq!(
            (swap.color.as_str(), swap.image.as_str()),
            ("blue", "web:v1")
        );
        assert_eq!(serving(&controller), (blue.clone(), blue_addr));
        let previous = controller
            .deployer
            .record("web")
            .previous
            .expect("green is warm");
        assert_eq!(previous.container.map(|c| c.id), Some(green.clone()));
        assert!(engine.container(&green).is_some_and(|c| c.running));
        assert_eq!(engine.changes_to(&blue), vec![format!("create {blue}")]);
        let metrics = &controller.writer.shared().metrics;
        assert_eq!(
            metrics.operations_counted(Operation::Deploy, "web", "ok"),
            2
        );
        assert_eq!(
            metrics.operations_counted(Operation::Rollback, "web", "ok"),
            1
        );
    }

    /// A bake window long enough to outlast what the tests below do, that
    /// breaks at more than 1% 5xx once 50 answers are in.
    const BAKE_20S: &str =
        "bake = { window = \"20s\", max_error_rate = \"1%\", min_requests = 50 }\n";

    /// A bake breach after a full switch: traffic goes back to blue, the
    /// deploy fails as `rolled_back`, and the metrics count the breach and
    /// the automatic rollback's time.
    #[tokio::test(start_paused = true)]
    async fn a_bake_breach_rolls_back_and_shows_in_the_metrics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, blue_addr) = blue_serving_with(&engine, dir.path(), BAKE_20S).await;
        engine.publish_next(app(200).await);

        let deploying = {
            let controller = Arc::clone(&controller);
            tokio::spawn(async move { deploy(&controller, "web:v2").await })
        };
        wait_until("green takes the traffic", || {
            controller
                .active("web")
                .is_some_and(|active| active.label == "green")
        })
        .await;
        let green = controller.active("web").expect("green");
        for status in std::iter::repeat_n(200, 90).chain(std::iter::repeat_n(500, 10)) {
            green.stats().record(status, Duration::from_millis(2));
        }
        let failed = deploying.await.expect("deploy task");
        let Err(ControlError::BakeFailed(message)) = failed else {
            panic!("the breach fails the deploy: {failed:?}");
        };
        assert!(message.contains("error rate 10.00%"), "{message}");
        assert_eq!(serving(&controller), (blue, blue_addr));

        let metrics = &controller.writer.shared().metrics;
        assert_eq!(metrics.bakes_counted("web", "switch", "breached"), 1);
        assert_eq!(metrics.bakes_counted("web", "switch", "passed"), 0);
        assert_eq!(
            metrics.operations_counted(Operation::Deploy, "web", "rolled_back"),
            1
        );
        let text = metrics_text(&controller);
        assert!(
            text.contains(
                "cutover_bakes_total{service=\"web\",phase=\"switch\",outcome=\"breached\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "cutover_bake_breach_to_switch_seconds_count{service=\"web\",phase=\"switch\"} 1"
            ),
            "{text}"
        );
    }

    /// The server's routing cell, reached through its controller, as the
    /// metrics scrape reads it.
    struct Cell(Arc<Controller>);

    impl crate::metrics::UpstreamSource for Cell {
        fn each_upstream(&self, f: &mut dyn FnMut(&str, &Arc<crate::upstream::Upstream>)) {
            self.0.writer.shared().each_upstream(f)
        }

        fn each_canary(&self, f: &mut dyn FnMut(&str, &str, f64)) {
            self.0.writer.shared().each_canary(f)
        }
    }

    /// cutover stops during a full switch's bake window (an upgrade, a
    /// crash): the window stays in the state file, the restart resumes it,
    /// and a breach after the restart still rolls back to the warm colour.
    #[tokio::test(start_paused = true)]
    async fn a_restart_resumes_the_bake_window_and_its_breach_rolls_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, blue_addr) = blue_serving_with(&engine, dir.path(), BAKE_20S).await;
        let saved_bake = || {
            StateStore::new(dir.path())
                .load()
                .expect("state file")
                .services
                .get("web")
                .and_then(|service| service.bake.clone())
        };
        assert_eq!(saved_bake(), None, "a first deploy is not judged");
        engine.publish_next(app(200).await);
        // As the admin socket does: the operation's token is a child of
        // the server's shutdown.
        let cancel = controller.writer.shutdown_token().child_token();
        let deploying = {
            let controller = Arc::clone(&controller);
            tokio::spawn(async move {
                let choice = ImageChoice::Image("web:v2".into());
                let progress = Progress::log_only();
                controller
                    .deploy("web", choice, None, None, &progress, &cancel)
                    .await
            })
        };
        wait_until("the window is recorded", || saved_bake().is_some()).await;
        let recorded = saved_bake().expect("recorded");
        assert_eq!(
            (recorded.color.as_str(), recorded.phase),
            ("green", BakePhase::Switch)
        );
        assert!(
            recorded.until >= crate::control::state::now_unix() + 19,
            "{recorded:?}"
        );

        // The server stops: the window ends unjudged and stays recorded.
        controller.writer.shutdown_token().cancel();
        deploying
            .await
            .expect("deploy task")
            .expect("the switch stands");
        assert_eq!(saved_bake(), Some(recorded.clone()));
        drop(controller);

        let restarted = controller_with(dir.path(), &engine, BAKE_20S);
        restarted.restore().await.expect("restore");
        restarted.reconcile().await;
        let green = restarted.active("web").expect("green serves");
        assert_eq!(green.label, "green");
        wait_until("the window is judged again", || {
            restarted
                .deployer
                .last_bake("web")
                .is_some_and(|bake| bake.state == "running")
        })
        .await;
        for status in std::iter::repeat_n(200, 45).chain(std::iter::repeat_n(503, 5)) {
            green.stats().record(status, Duration::from_millis(2));
        }
        wait_until("the breach rolls back to blue", || {
            serving(&restarted).0 == blue
        })
        .await;
        assert_eq!(serving(&restarted), (blue, blue_addr));
        let verdict = restarted.deployer.last_bake("web").expect("a verdict");
        assert_eq!(verdict.state, "breached", "{verdict:?}");
        assert_eq!(
            restarted
                .writer
                .shared()
                .metrics
                .bakes_counted("web", "switch", "breached"),
            1
        );
        wait_until("the window leaves the state file", || {
            saved_bake().is_none()
        })
        .await;
    }

    /// A restart after the window's colour was rolled back (or retired)
    /// drops the stale window instead of judging the wrong colour.
    #[tokio::test(start_paused = true)]
    async fn a_stale_bake_window_is_dropped_at_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, _, _) = blue_serving(&engine, dir.path()).await;
        drop(controller);
        let store = StateStore::new(dir.path());
        let mut state = store.load().expect("state file");
        let web = state.services.get_mut("web").expect("web");
        web.bake = Some(BakeState {
            color: "green".into(),
            phase: BakePhase::Switch,
            until: crate::control::state::now_unix() + 60,
        });
        store.save(&state).expect("save");

        let restarted = controller_with(dir.path(), &engine, BAKE_20S);
        restarted.restore().await.expect("restore");
        restarted.reconcile().await;
        wait_until("the stale window is dropped", || {
            store.load().expect("state").services["web"].bake.is_none()
        })
        .await;
        assert_eq!(restarted.deployer.last_bake("web"), None, "nothing judged");
    }

    /// A breach while an upgrade's hand-off holds every service's claim:
    /// the rollback waits for the claim instead of giving up, and happens
    /// once the claim is back (the hand-off failed and this process serves
    /// on).
    #[tokio::test(start_paused = true)]
    async fn a_breach_during_a_hand_off_waits_for_the_claim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, blue_addr) = blue_serving_with(&engine, dir.path(), BAKE_20S).await;
        engine.publish_next(app(200).await);
        let deploying = {
            let controller = Arc::clone(&controller);
            tokio::spawn(async move { deploy(&controller, "web:v2").await })
        };
        wait_until("the window runs", || {
            controller
                .deployer
                .last_bake("web")
                .is_some_and(|bake| bake.state == "running")
        })
        .await;
        let green = controller.active("web").expect("green");
        let hand_off = controller
            .writer
            .claim("web")
            .expect("claim, as upgrade does");
        for status in std::iter::repeat_n(200, 45).chain(std::iter::repeat_n(503, 5)) {
            green.stats().record(status, Duration::from_millis(2));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            controller.active("web").map(|a| a.label.clone()).as_deref(),
            Some("green"),
            "nothing moves while the hand-off holds the claim"
        );
        assert!(!deploying.is_finished(), "the deploy waits for its verdict");
        drop(hand_off);
        let failed = deploying.await.expect("deploy task");
        assert!(
            matches!(failed, Err(ControlError::BakeFailed(_))),
            "{failed:?}"
        );
        assert_eq!(serving(&controller), (blue, blue_addr));
        let verdict = controller.deployer.last_bake("web").expect("verdict");
        assert!(verdict.breach_to_switch_ms.is_some(), "{verdict:?}");
    }

    /// The metrics endpoint's text for `controller`'s server.
    fn metrics_text(controller: &Arc<Controller>) -> String {
        let metrics = &controller.writer.shared().metrics;
        let cell = Arc::new(Cell(Arc::clone(controller)));
        let scrape = crate::metrics::endpoint::scrape(metrics, cell, None);
        let registry = crate::metrics::endpoint::registry(scrape);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("encode");
        text
    }

    /// The old colour runs for `keep_previous` (30 s) after the switch, then
    /// is stopped and removed: on the paused clock, no wall-clock wait.
    #[tokio::test(start_paused = true)]
    async fn the_warm_colour_is_retired_after_keep_previous() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(FakeEngine::default());
        let (controller, blue, _) = blue_serving(&engine, dir.path()).await;
        engine.publish_next(app(200).await);
        deploy(&controller, "web:v2").await.expect("second deploy");

        tokio::time::advance(Duration::from_secs(28)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            engine.container(&blue).is_some(),
            "retired before its window ended"
        );

        tokio::time::advance(Duration::from_secs(3)).await;
        wait_until("blue is retired", || engine.container(&blue).is_none()).await;
        assert_eq!(
            engine.changes_to(&blue),
            vec![format!("create {blue}"), format!("stop {blue}")]
        );
        wait_until("the retirement is recorded", || {
            controller.deployer.record("web").previous.is_none()
        })
        .await;
        let saved = StateStore::new(dir.path()).load().expect("state file");
        assert_eq!(saved.services["web"].previous, None);
    }

    mod canary {
        //! Canary deploys against the fake engine: the split survives a
        //! restart with its container, abort removes that container, and
        //! a stepped rollout goes through its shares or stops at a breach.

        use std::sync::Arc;

        use tokio_util::sync::CancellationToken;

        use super::*;

        const STEPS: &str = "bake = { window = \"5s\", min_requests = 20, steps = [\"10%\", \"50%\", \"100%\"], step_interval = \"2s\" }\n";

        /// Blue serving, then a plain deploy of green running in the
        /// background through `STEPS`.
        async fn stepping(
            dir: &Path,
            engine: &Arc<FakeEngine>,
        ) -> (
            Arc<Controller>,
            String,
            tokio::task::JoinHandle<Result<String, ControlError>>,
        ) {
            let (controller, blue, _) = blue_serving_with(engine, dir, STEPS).await;
            engine.publish_next(app(200).await);
            let deploying = {
                let controller = Arc::clone(&controller);
                tokio::spawn(async move { deploy(&controller, "web:v2").await })
            };
            (controller, blue, deploying)
        }

        fn share(controller: &Controller) -> Option<u32> {
            controller
                .writer
                .canary("web")
                .map(|canary| canary.share_bp)
        }

        #[tokio::test(start_paused = true)]
        async fn a_stepped_rollout_goes_through_its_shares_then_promotes() {
            let dir = tempfile::tempdir().expect("tempdir");
            let engine = Arc::new(FakeEngine::default());
            let (controller, _, deploying) = stepping(dir.path(), &engine).await;
            wait_until("10%", || share(&controller) == Some(1_000)).await;
            wait_until("50%", || share(&controller) == Some(5_000)).await;
            let saved = StateStore::new(dir.path()).load().expect("state file");
            assert_eq!(
                saved.services["web"].canary.as_ref().map(|c| c.share_bp),
                Some(5_000)
            );
            let green = deploying.await.expect("task").expect("the rollout passes");
            assert_eq!(serving(&controller).0, green, "promoted at the last step");
            assert_eq!(share(&controller), None);
            let bake = controller.deployer.last_bake("web").expect("a verdict");
            assert_eq!(
                (bake.phase.as_str(), bake.state.as_str()),
                ("switch", "passed")
            );
            let metrics = &controller.writer.shared().metrics;
            assert_eq!(
                metrics.bakes_counted("web", "canary", "passed"),
                2,
                "two steps"
            );
            assert_eq!(metrics.bakes_counted("web", "switch", "passed"), 1);
        }

        #[tokio::test(start_paused = true)]
        async fn a_breach_at_a_step_aborts_the_rollout() {
            let dir = tempfile::tempdir().expect("tempdir");
            let engine = Arc::new(FakeEngine::default());
            let (controller, blue, deploying) = stepping(dir.path(), &engine).await;
            wait_until("50%", || share(&controller) == Some(5_000)).await;
            let canary = controller.writer.canary("web").expect("canary");
            for status in std::iter::repeat_n(200, 15).chain(std::iter::repeat_n(500, 5)) {
                canary
                    .upstream
                    .stats()
                    .record(status, Duration::from_millis(1));
            }
            let failed = deploying.await.expect("task");
            let Err(ControlError::BakeFailed(message)) = failed else {
                panic!("the breach fails the deploy: {failed:?}");
            };
            assert!(message.contains("error rate 25.00%"), "{message}");
            assert_eq!(share(&controller), None, "the canary is aborted");
            assert_eq!(serving(&controller).0, blue);
            let green = canary
                .upstream
                .container
                .as_ref()
                .expect("container")
                .id
                .clone();
            assert!(
                engine.container(&green).is_none(),
                "its container is removed"
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_restart_keeps_the_split_and_the_canary_container_until_abort() {
            let dir = tempfile::tempdir().expect("tempdir");
            let engine = Arc::new(FakeEngine::default());
            let (controller, blue, blue_addr) = blue_serving(&engine, dir.path()).await;
            let green_addr = app(200).await;
            engine.publish_next(green_addr);
            let report = controller
                .deploy(
                    "web",
                    ImageChoice::Image("web:v2".into()),
                    Some(1_000),
                    None,
                    &Progress::log_only(),
                    &CancellationToken::new(),
                )
                .await
                .expect("canary deploy");
            assert_eq!(report.canary_share_bp, Some(1_000));
            let green = report.container;
            assert_eq!(
                serving(&controller),
                (blue.clone(), blue_addr),
                "blue stays active"
            );
            let saved = StateStore::new(dir.path()).load().expect("state file");
            let canary = saved.services["web"]
                .canary
                .clone()
                .expect("split persisted");
            assert_eq!((canary.color.as_str(), canary.share_bp), ("green", 1_000));

            drop(controller);
            let restarted = controller_for_restart(dir.path(), &engine);
            restarted.restore().await.expect("restore");
            restarted.reconcile().await;
            assert_eq!(serving(&restarted), (blue.clone(), blue_addr));
            let split = restarted
                .writer
                .canary("web")
                .expect("the split is restored");
            assert_eq!((split.upstream.addr, split.share_bp), (green_addr, 1_000));
            assert!(
                engine.container(&green).is_some_and(|c| c.running),
                "reconciliation keeps the canary's container"
            );
            let text = metrics_text(&restarted);
            assert!(
                text.contains("cutover_canary_share_ratio{service=\"web\",colour=\"green\"} 0.1"),
                "{text}"
            );
            assert!(
                text.contains(
                    "cutover_http_requests_in_flight{service=\"web\",colour=\"green\"} 0"
                ),
                "the canary's upstream is scraped too: {text}"
            );

            let aborted = restarted
                .abort("web", &Progress::log_only())
                .await
                .expect("abort");
            assert!(aborted.removed, "{aborted:?}");
            assert!(engine.container(&green).is_none(), "the canary is removed");
            assert!(restarted.writer.canary("web").is_none());
            let saved = StateStore::new(dir.path()).load().expect("state file");
            assert!(saved.services["web"].canary.is_none());
            assert_eq!(serving(&restarted), (blue, blue_addr));
            let text = metrics_text(&restarted);
            assert!(!text.contains("cutover_canary_share_ratio"), "{text}");
        }
    }
}
