/*
 * colocate SPANK plugin: adds --colocate=allow|deny to sbatch, salloc and srun.
 *
 * The choice travels in the job's control environment as SPANK_COLOCATE=allow|deny,
 * which slurmd passes to Prolog= and Epilog= (and PrologSlurmctld=). colocate's prolog
 * hook forwards it to the node agent: a job that says "deny" never shares its cores or
 * memory; a job that says nothing gets the site default (agent.default_colocate).
 *
 * Build:    gcc -shared -fPIC -Wall -Werror -o colocate_spank.so colocate_spank.c
 *           (needs <slurm/spank.h>, Debian package libslurm-dev; nothing to link)
 * Register: a line "optional /path/to/colocate_spank.so" in plugstack.conf
 *           (or python -m slurm_plugin.spank register --so /path/to/colocate_spank.so)
 *
 * The option is registered with spank_option_register() in slurm_spank_init: an option
 * in the static spank_options[] table is only seen by srun, and sbatch would reject it.
 */

#include <string.h>
#include <strings.h>

#include <slurm/spank.h>

SPANK_PLUGIN(colocate, 1);

#define COLOCATE_ENV "COLOCATE" /* becomes SPANK_COLOCATE in the prolog's environment */

/* The validated choice of this command ("" = not given). */
static char colocate_choice[8] = "";

static int colocate_opt_cb(int val, const char *optarg, int remote);

static struct spank_option colocate_option = {
    "colocate",
    "allow|deny",
    "Let colocate lend this job's idle cores and unused memory to serverless "
    "functions (allow) or keep them to the job (deny). Default: the site's choice.",
    1,
    0,
    colocate_opt_cb,
};

static int colocate_opt_cb(int val, const char *optarg, int remote)
{
    (void) val;
    if (optarg != NULL && strcasecmp(optarg, "allow") == 0) {
        strcpy(colocate_choice, "allow");
        return 0;
    }
    if (optarg != NULL && strcasecmp(optarg, "deny") == 0) {
        strcpy(colocate_choice, "deny");
        return 0;
    }
    slurm_error("colocate: invalid value '%s' for --colocate; use --colocate=allow or --colocate=deny",
                optarg != NULL ? optarg : "");
    return -1; /* the command then refuses the option and stops */
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    spank_err_t rc;

    (void) ac;
    (void) av;
    /* Only the user commands and slurmstepd parse options; slurmd and the prolog do not. */
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR && ctx != S_CTX_REMOTE)
        return 0;
    rc = spank_option_register(sp, &colocate_option);
    if (rc != ESPANK_SUCCESS) {
        slurm_error("colocate: cannot register --colocate: %s", spank_strerror(rc));
        return -1;
    }
    return 0;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    spank_err_t rc;

    (void) ac;
    (void) av;
    if (colocate_choice[0] == '\0')
        return 0;
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR)
        return 0;
    rc = spank_job_control_setenv(sp, COLOCATE_ENV, colocate_choice, 1);
    if (rc != ESPANK_SUCCESS) {
        /* srun inside an existing allocation: the prolog already ran; nothing to tell. */
        slurm_debug("colocate: cannot pass --colocate=%s to the prolog: %s",
                    colocate_choice, spank_strerror(rc));
    }
    return 0;
}
