//! Per-backend load over a run: every tick, each in-process simulator's
//! running + waiting requests, read from its engine directly (no request,
//! so the measurement does not load the simulators).
use std::{sync::Arc, time::Duration};

use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use vllm_sim::engine::Engine;

/// How often the simulators are sampled.
pub const EVERY: Duration = Duration::from_millis(50);

/// The most samples a run keeps (83 minutes at [`EVERY`]); sampling stops
/// there.
const MAX_SAMPLES: usize = 100_000;

/// Samples of one run.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// Seconds from the start of the load to each sample.
    pub times: Vec<f64>,
    /// `per_backend[b][i]`: running + waiting on backend `b` at `times[i]`.
    pub per_backend: Vec<Vec<u32>>,
}

impl Samples {
    /// The most requests any backend held at once.
    pub fn peak(&self) -> u32 {
        self.per_backend
            .iter()
            .flat_map(|v| v.iter().copied())
            .max()
            .unwrap_or(0)
    }
}

/// A sampling task, started with [`Sampler::start`].
#[derive(Debug)]
pub struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Samples>,
}

impl Sampler {
    /// Samples `engines` every [`EVERY`] from now until [`Sampler::finish`].
    pub fn start(engines: Vec<Arc<Engine>>) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut out = Samples {
                times: Vec::new(),
                per_backend: vec![Vec::new(); engines.len()],
            };
            let start = Instant::now();
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while out.times.len() < MAX_SAMPLES {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                out.times.push(start.elapsed().as_secs_f64());
                for (engine, series) in engines.iter().zip(out.per_backend.iter_mut()) {
                    let g = engine.gauges();
                    series.push(u32::try_from(g.running + g.waiting).unwrap_or(u32::MAX));
                }
            }
            out
        });
        Self { stop, task }
    }

    /// Stops sampling and returns the samples (empty if the task failed).
    pub async fn finish(self) -> Samples {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}
