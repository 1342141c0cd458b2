/*
 * socc: a stand-in for TVM's src/support/pipe.h. The one runtime file that includes it
 * (rpc/rpc_pipe_impl.cc) calls POSIX pipe(), read(), write() and kill() itself, so this only
 * supplies the system headers for them.
 */
#ifndef TVM_SUPPORT_PIPE_H_
#define TVM_SUPPORT_PIPE_H_

#include <errno.h>
#include <signal.h>
#include <unistd.h>

#endif  // TVM_SUPPORT_PIPE_H_
