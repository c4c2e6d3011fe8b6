//! A fake [`Agent`] for the shim's unit tests: records every call, fails the RPCs a test
//! names, and lets the test end processes (WaitProcess blocks until it does, or until the
//! fake "VM" stops).

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex, MutexGuard};

use containerd_shim::protos::ttrpc::Code;

use super::{
    Agent, AgentError, ConfigureNetworkRequest, CreateSandboxRequest, GetVersionResponse,
    GuestExit, NewContainer, StatsResponse, StdioFlags, StreamKind,
};

#[derive(Default)]
struct State {
    calls: Vec<String>,
    fail: HashMap<&'static str, Code>,
    /// (container, exec) that exist in the fake guest.
    procs: HashSet<(String, String)>,
    exits: HashMap<(String, String), GuestExit>,
    next_pid: u32,
    /// The guest ends of attached streams.
    streams: Vec<UnixStream>,
    ooms: VecDeque<String>,
    /// The fake VM stopped: blocking calls fail.
    stopped: bool,
}

#[derive(Default)]
pub struct FakeAgent {
    state: Mutex<State>,
    changed: Condvar,
}

impl FakeAgent {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every later call of `rpc` fails with `code`.
    pub fn fail(&self, rpc: &'static str, code: Code) {
        self.lock().fail.insert(rpc, code);
    }

    /// The calls so far, as "Rpc id exec" lines (empty parts left out).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Ends process (`id`, `exec_id`) with `status`.
    pub fn exit(&self, id: &str, exec_id: &str, status: u32) {
        let key = (id.to_string(), exec_id.to_string());
        self.lock()
            .exits
            .insert(key, GuestExit { status, at_ns: 7 });
        self.changed.notify_all();
    }

    /// Reports an OOM kill in container `id`.
    pub fn oom(&self, id: &str) {
        self.lock().ooms.push_back(id.to_string());
        self.changed.notify_all();
    }

    /// The fake VM stops: WaitProcess and GetOOMEvent fail from now on.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    fn call(&self, rpc: &'static str, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let mut s = self.lock();
        let line = [rpc, id, exec_id]
            .iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(" ");
        s.calls.push(line);
        match s.fail.get(rpc) {
            Some(code) => Err(AgentError::status(rpc, *code, "injected failure")),
            None if s.stopped && rpc != "DestroySandbox" => {
                Err(AgentError::transport(rpc, "the VM stopped"))
            }
            None => Ok(()),
        }
    }

    fn spawn(&self, id: &str, exec_id: &str) -> u32 {
        let mut s = self.lock();
        s.next_pid += 1;
        s.procs.insert((id.to_string(), exec_id.to_string()));
        s.next_pid
    }
}

impl Agent for FakeAgent {
    fn get_version(&self) -> Result<GetVersionResponse, AgentError> {
        self.call("GetVersion", "", "")?;
        Ok(GetVersionResponse::new())
    }
    fn create_sandbox(&self, _req: CreateSandboxRequest) -> Result<(), AgentError> {
        self.call("CreateSandbox", "", "")
    }
    fn configure_network(&self, _req: &ConfigureNetworkRequest) -> Result<(), AgentError> {
        self.call("ConfigureNetwork", "", "")
    }
    fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.call("DestroySandbox", "", "")
    }
    fn create_container(&self, c: NewContainer) -> Result<u32, AgentError> {
        self.call("CreateContainer", &c.id, "")?;
        Ok(self.spawn(&c.id, ""))
    }
    fn start_container(&self, id: &str) -> Result<(), AgentError> {
        self.call("StartContainer", id, "")
    }
    fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        self.call("RemoveContainer", id, "")?;
        self.lock().procs.retain(|(c, _)| c != id);
        Ok(())
    }
    fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        self.call("PauseContainer", id, "")
    }
    fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        self.call("ResumeContainer", id, "")
    }
    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        self.call("ListProcesses", id, "")?;
        Ok(vec![1])
    }
    fn stats(&self, id: &str) -> Result<StatsResponse, AgentError> {
        self.call("Stats", id, "")?;
        Ok(StatsResponse::new())
    }
    fn update_resources(&self, id: &str, _resources: Vec<u8>) -> Result<(), AgentError> {
        self.call("UpdateResources", id, "")
    }
    fn set_online_cpus(&self, count: u32) -> Result<u32, AgentError> {
        self.call("SetOnlineCpus", &count.to_string(), "")?;
        Ok(count)
    }
    fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        _process_json: Vec<u8>,
        _stdio: StdioFlags,
    ) -> Result<u32, AgentError> {
        self.call("ExecProcess", id, exec_id)?;
        Ok(self.spawn(id, exec_id))
    }
    fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.call("SignalProcess", id, exec_id)?;
        if matches!(signal, 9 | 15) {
            self.exit(id, exec_id, 128 + signal);
        }
        Ok(())
    }
    fn wait_process(&self, id: &str, exec_id: &str) -> Result<GuestExit, AgentError> {
        self.call("WaitProcess", id, exec_id)?;
        let key = (id.to_string(), exec_id.to_string());
        let mut s = self.lock();
        loop {
            if let Some(exit) = s.exits.get(&key) {
                return Ok(*exit);
            }
            if s.stopped {
                return Err(AgentError::transport("WaitProcess", "the VM stopped"));
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
    fn remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        self.call("RemoveProcess", id, exec_id)?;
        self.lock()
            .procs
            .remove(&(id.to_string(), exec_id.to_string()));
        Ok(())
    }
    fn close_stdin(&self, id: &str, exec_id: &str, _bytes: u64) -> Result<(), AgentError> {
        self.call("CloseStdin", id, exec_id)
    }
    fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        _cols: u32,
        _rows: u32,
    ) -> Result<(), AgentError> {
        self.call("ResizeTty", id, exec_id)
    }
    fn get_oom_event(&self) -> Result<String, AgentError> {
        let mut s = self.lock();
        loop {
            if let Some(id) = s.ooms.pop_front() {
                return Ok(id);
            }
            if s.stopped {
                return Err(AgentError::transport("GetOOMEvent", "the VM stopped"));
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
    fn attach_stream(
        &self,
        kind: StreamKind,
        id: &str,
        exec_id: &str,
    ) -> Result<UnixStream, AgentError> {
        let rpc = match kind {
            StreamKind::Stdin => "attach stdin",
            StreamKind::Stdout => "attach stdout",
            StreamKind::Stderr => "attach stderr",
            StreamKind::Pty => "attach pty",
        };
        self.call(rpc, id, exec_id)?;
        let (shim, guest) =
            UnixStream::pair().map_err(|e| AgentError::transport("stream attach", e))?;
        self.lock().streams.push(guest);
        Ok(shim)
    }
}
