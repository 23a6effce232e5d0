//! One container of the pod: its init process, its execs, and the host
//! resources its Create made; and the pod's table of containers, where an
//! id is reserved for the whole of its Create so two Creates of one id
//! cannot both proceed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::process::Process;
use super::PodError;
use crate::resources::ContainerResources;

/// One container.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Taken (and so undone) when the container is deleted.
    resources: Mutex<Option<ContainerResources>>,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: PathBuf,
        init: Arc<Process>,
        resources: ContainerResources,
    ) -> Self {
        Self {
            id: id.to_owned(),
            bundle,
            init,
            execs: Mutex::new(HashMap::new()),
            resources: Mutex::new(Some(resources)),
        }
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The init (empty `exec_id`) or an exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, PodError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs().get(exec_id).cloned().ok_or_else(|| {
            PodError::NotFound(format!(
                "exec {exec_id} of container {} does not exist",
                self.id
            ))
        })
    }

    /// Adds an exec that is not started yet.
    pub fn add_exec(&self, process: Process) -> Result<(), PodError> {
        let mut execs = self.execs();
        if execs.contains_key(&process.exec_id) {
            return Err(PodError::AlreadyExists(format!(
                "exec {} of {} already exists",
                process.exec_id, self.id
            )));
        }
        execs.insert(process.exec_id.clone(), Arc::new(process));
        Ok(())
    }

    /// Forgets an exec.
    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        self.execs().remove(exec_id)
    }

    /// The init and every exec.
    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(self.execs().values().cloned());
        all
    }

    /// Undoes the container's host resources (once).
    pub fn release_resources(&self) {
        let resources = self
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(resources);
    }
}

/// The pod's containers, and the ids whose Create is under way.
#[derive(Default)]
pub struct Containers {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    ready: HashMap<String, Arc<Container>>,
    creating: HashSet<String>,
}

/// An id reserved for a Create; released on drop unless committed.
pub struct Reservation<'a> {
    containers: &'a Containers,
    id: String,
    committed: bool,
}

impl Reservation<'_> {
    /// Makes the container visible under the reserved id.
    pub fn commit(mut self, container: Arc<Container>) {
        let mut table = self.containers.table();
        table.creating.remove(&self.id);
        table.ready.insert(self.id.clone(), container);
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.containers.table().creating.remove(&self.id);
        }
    }
}

impl Containers {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `id` for a Create: ALREADY_EXISTS if a container of that
    /// id exists or is being created.
    pub fn reserve(&self, id: &str) -> Result<Reservation<'_>, PodError> {
        let mut table = self.table();
        if table.ready.contains_key(id) || table.creating.contains(id) {
            return Err(PodError::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        table.creating.insert(id.to_owned());
        Ok(Reservation {
            containers: self,
            id: id.to_owned(),
            committed: false,
        })
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>, PodError> {
        self.table()
            .ready
            .get(id)
            .cloned()
            .ok_or_else(|| PodError::NotFound(format!("container {id} does not exist")))
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Container>> {
        self.table().ready.remove(id)
    }

    /// Containers that exist, not counting those being created.
    pub fn count(&self) -> usize {
        self.table().ready.len()
    }

    /// Whether no container exists and none is being created.
    pub fn is_idle(&self) -> bool {
        let table = self.table();
        table.ready.is_empty() && table.creating.is_empty()
    }

    pub fn all(&self) -> Vec<Arc<Container>> {
        self.table().ready.values().cloned().collect()
    }
}
