//! The serving threads beside the main one (`server.worker_threads` above 1): each drives a
//! current-thread runtime of its own until the server has drained.

use std::io;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The running serving threads; [`Workers::stop`] ends them.
pub struct Workers {
    threads: Vec<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Workers {
    /// Starts `threads - 1` serving threads and installs their runtimes, after `main` (the
    /// runtime the caller drives), as the serving runtimes. Call it once, before serving.
    pub fn start(main: &Handle, threads: usize) -> io::Result<Workers> {
        let mut handles = vec![main.clone()];
        let mut workers = Workers {
            threads: Vec::new(),
        };
        for index in 1..threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("serve-{index}"))
                .spawn(move || {
                    crate::serving::enter(index);
                    runtime.block_on(async {
                        // Ends with the runtime.
                        tokio::spawn(super::heartbeat());
                        let _ = stopped.await;
                    });
                    // Dropping the runtime drops what is left on it: connections cut at the end
                    // write their records now.
                })?;
            workers.threads.push((stop, thread));
        }
        if !crate::serving::install(handles) {
            return Err(io::Error::other("the serving threads were already started"));
        }
        Ok(workers)
    }

    /// Ends every serving thread and waits for it, once the server has drained (what still runs
    /// on them is dropped).
    pub fn stop(self) {
        let mut joins = Vec::new();
        for (stop, thread) in self.threads {
            let _ = stop.send(());
            joins.push(thread);
        }
        for thread in joins {
            if thread.join().is_err() {
                tracing::error!("a serving thread panicked");
            }
        }
    }
}
